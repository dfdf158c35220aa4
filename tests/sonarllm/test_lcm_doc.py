"""docs/lcm.md's recipe (SonarTokenLoss as an LCM criterion term) runs as written on a tiny
fairseq2-shaped decoder of each generation, and gives the materialised-logits loss with the
labels written out by hand (truncated sentences without an invented </s>)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sonarllm.normalizer import SonarNormalizer
from tests.sonarllm import fairseq2_mimic as fs2
from tests.sonarllm.sonar_fixtures import decoder, load, tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "lcm.md"


def recipe() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "decoder_backprop_term" in b]
    return block


@pytest.mark.parametrize("generation", fs2.GENERATIONS)
def test_the_documented_lcm_recipe_gives_the_materialised_loss(generation):
    fx, tok = load("decoder"), tokenizer()
    full = tok.encode(["The cat sat on the mat.", "Hello!", "Il fait beau aujourd'hui."], lang="eng_Latn", mode="target")
    cut = 6  # LCM's truncate_sequence(max_len=6)
    seqs = [s[:cut] for s in full]
    assert seqs[1][-1] == 3 and seqs[0][-1] != 3  # one whole sentence, at least one cut
    lens = torch.tensor([len(s) for s in seqs])
    prefix = torch.tensor([s + [0] * (cut - len(s)) for s in seqs])  # LCM's padded prefix batch
    normalizer = SonarNormalizer.from_tensors(torch.randn(64) * 0.01, torch.rand(64) + 0.5)
    pred = torch.randn(3, 64, requires_grad=True)
    scope = {"sonar_decoder": fs2.build("decoder", fx["config"], fx["state_dict"], generation),
             "flattened_predictions": pred, "sonar_normalizer": normalizer, "prefix_seqs": prefix,
             "seq_lens": lens, "mse_loss": torch.tensor(0.5), "weight": 0.1}  # fmt: skip
    exec(compile(recipe(), str(DOC), "exec"), scope)
    # by hand: complete sentences [</s>, lang, .., </s>] -> labels + an extra </s> (the paper's);
    # cut ones -> inputs without the last token, labels the tokens shown
    inputs = [s if s[-1] == 3 else s[:-1] for s in seqs]
    labels = [s[1:] + [3] if s[-1] == 3 else s[1:] for s in seqs]
    width = max(map(len, inputs))
    tok_BT = torch.tensor([x + [0] * (width - len(x)) for x in inputs])
    lab_BT = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    dec = decoder()
    logits = dec.logits(dec.hidden_states_padded(normalizer.denormalize(pred), tok_BT))
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab_BT.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(scope["loss"], 0.5 + 0.1 * want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(scope["loss"], pred)
    (g_want,) = torch.autograd.grad(0.1 * want, pred)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)
