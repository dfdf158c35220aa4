"""The toy SONAR: a seeded build, and the autoencoder training that makes its space meaningful."""

import torch

from sonarllm.sonar import SonarTokenizer, load_sonar_decoder
from sonarllm.sonar.generation import BeamSearchOptions
from sonarllm.sonar.pipeline import SonarPipeline
from sonarllm.sonar.toy import build_toy_sonar, train_toy_sonar, train_toy_tokenizer

SENTENCES = ["Lily went to the park.", "Tom had a red ball.", "The cat sat on the mat.", "End of sequence.",
             "She was very happy.", "They played until the sun went down."]  # fmt: skip


def test_toy_sonar_is_seeded_and_learns_to_reconstruct(tmp_path):
    spm = train_toy_tokenizer(SENTENCES * 20, tmp_path / "spm.model", vocab_size=60)
    tok = SonarTokenizer(spm)
    enc, dec = build_toy_sonar(tok, tmp_path / "a", seed=3)
    enc2, dec2 = build_toy_sonar(tok, tmp_path / "b", seed=3)
    for x, y in ((enc, enc2), (dec, dec2)):
        a, b = torch.load(x, weights_only=True)["model"], torch.load(y, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_sonar_decoder(dec).config.vocab_size == tok.vocab_size  # sizes travel with the file
    losses = train_toy_sonar(tok, enc, dec, SENTENCES, steps=150, batch_size=16, seed=0)
    assert losses[-1] < 0.1 * losses[0]
    pipe = SonarPipeline.from_files(spm, enc, dec, kernel_impl="torch")
    decoded = pipe.decode(pipe.encode(SENTENCES), options=BeamSearchOptions(beam_size=2, max_gen_len=(0, 60)))
    assert decoded == SENTENCES
