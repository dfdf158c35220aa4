"""The trainer's start-up checks on its data (part of ``Trainer``, training/loop.py): the prepared
directory is made or verified (shards, SONAR files, options against the configuration, an edited
corpus noted), the splits opened, one optimizer step and the longest document checked to fit,
and the SONAR normalizer read or fitted. Each refusal is one line naming the key to change.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import EXAMPLE_CORPUS, ConfigError, DataConfig
from training.shards import ShardError


def _prepared_with(manifest: dict) -> dict:
    """The data.* settings a prepared directory was made with: from its manifest's options, and
    from the recorded command what the options record only as resolved (the SONAR as file
    digests, the evaluation documents as capped to the corpus)."""
    words = shlex.split(manifest.get("command") or "")
    asked = {flag: words[i + 1] for i, flag in enumerate(words[:-1]) if flag in ("--sonar", "--eval-documents")}
    options = manifest["options"]
    settings = {"data.lang": options["lang"], "data.max_sentences": options["max_sentences"],
                "data.eval_documents": int(asked.get("--eval-documents", options["eval_documents"]))}  # fmt: skip
    if "--sonar" in asked:
        settings["data.sonar"] = asked["--sonar"]
    return settings


def _same_setting(configured, prepared) -> bool:
    """Equal, or (data.sonar) paths naming the same file."""
    if configured == prepared:
        return True
    return isinstance(configured, str) and os.path.isfile(configured) and os.path.isfile(prepared) and \
        os.path.samefile(configured, prepared)


def changed_corpus_note(manifest: dict, prepared_dir) -> str | None:
    """A complete preparation is used as it is: if its corpus was edited since (its size or
    modification time differ from the manifest's record, and so does its content), the line
    that says so, rather than training silently on the old version; else None."""
    from training.prepare_data import corpus_digest, source_stat

    source, recorded = Path(manifest["options"].get("source", "")), manifest.get("source_stat")
    if recorded is None or not source.exists():
        return None
    if source_stat(source) == recorded or corpus_digest(source) == manifest["options"].get("source_sha256"):
        return None
    return (f"the corpus {source} changed after data.prepared_dir {prepared_dir} was prepared from it; training on "
            "the prepared data (prepare it again into a new data.prepared_dir to train on the new version)")


class StartupChecks:
    """``Trainer``'s data start-up (a mixin: it uses the trainer's ``cfg``, ranks and device)."""

    def _normalizer(self, dim: int):
        """The SONAR normalizer of a fresh run: model.normalizer's file when set (checked for its
        width and for clipping, which the fused projections cannot apply), else a robust fit on
        (up to) the first 2000 training documents (nothing is fitted at preparation)."""
        from sonarllm.normalizer import SonarNormalizer

        path = self.cfg.model.normalizer
        if not path:
            sample = torch.cat([self.train_docs[d].embeddings for d in range(min(len(self.train_docs), 2000))])
            return SonarNormalizer(dim).fit(sample.float())
        try:
            norm = SonarNormalizer.load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.normalizer: {exc}") from None
        if norm.dim != dim:
            raise ConfigError(f"model.normalizer {path} is {norm.dim}-d but the model works in {dim}-d SONAR space")
        if norm.clips:
            raise ConfigError(f"model.normalizer {path} has clip_min/clip_max (LCM's clip_proba), which the model's "
                              f"fused projections do not apply; use a file without them")  # fmt: skip
        return norm

    def _ensure_prepared(self) -> Path:
        """Prepare the data once (global rank 0), unless a complete preparation is already there;
        then one process per node fetches the SONAR files and verifies the shards. The other
        ranks wait on a gloo group without the default 10-minute collective timeout: preparing a
        real corpus takes hours. (A failing rank 0 exits, which ends the others' wait.)"""
        from sonarllm.sonar.download import ASSETS, fetch
        from sonarllm.sonar.pipeline import SonarSpec
        from training import prepare_data
        from training.shards import (
            MANIFEST,
            read_manifest,
            rebuild_command,
            verify_shards,
            verify_sonar,
        )

        wait = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        prepared = Path(self.cfg.data.prepared_dir)
        existing = read_manifest(prepared) if (prepared / MANIFEST).is_file() else {}
        complete = existing.get("complete", False)
        if complete:
            self._check_prepared_matches(existing)
        elif not self.cfg.data.source and os.path.normpath(prepared) != os.path.normpath(DataConfig.prepared_dir):
            # only the default directory is prepared from the embedded example: a mistyped path
            # must not silently train on it
            state = (f"an unfinished preparation (finish it with: {rebuild_command(existing, prepared)})" if existing
                     else f"no prepared data ({MANIFEST} missing)")  # fmt: skip
            raise ConfigError(
                f"data.prepared_dir {prepared} holds {state} and data.source is empty; set data.source to the "
                f"corpus to prepare there, or check the path"
            )
        if not complete and self.rank == 0:
            d = self.cfg.data
            args = prepare_data.parse_args([
                "--source", d.source or EXAMPLE_CORPUS, "--out", str(prepared), "--sonar", d.sonar, "--lang", d.lang,
                "--max-sentences", str(d.max_sentences), "--eval-documents", str(d.eval_documents),
                "--device", self.device.type,
            ] + ([] if self.cfg.system.progress else ["--quiet"]))  # fmt: skip
            try:
                prepare_data.prepare(args)
            except prepare_data.ForeignOutError as exc:
                raise ConfigError(f"data.prepared_dir {exc}") from None
            except (ValueError, OSError) as exc:
                raise ShardError(f"cannot prepare data.prepared_dir {prepared}: {exc}") from exc
        dist.barrier(group=wait)
        if self.local_rank == 0:
            spec = SonarSpec.load(prepared / "sonar.json")
            for name in (spec.tokenizer, spec.decoder):
                if name in ASSETS or "://" in name:
                    fetch(name)  # into this node's cache, once, before every rank loads it
            if self.cfg.data.verify_checksums:
                verify_shards(prepared)
            if self.cfg.data.verify_sonar:  # the files training uses (not the encoder)
                verify_sonar(prepared, fields=("tokenizer", "decoder"))
        if complete and self.rank == 0 and (note := changed_corpus_note(existing, prepared)):
            print(f"train.py: note: {note}", file=sys.stderr, flush=True)
        dist.barrier(group=wait)
        return prepared

    def _open_split(self, prepared: Path, split: str):
        """The documents of one split (verified in _ensure_prepared unless data.verify_checksums is
        false); a shard safetensors cannot open (truncated, overwritten) is named in one line."""
        from safetensors import SafetensorError, safe_open

        from training.shards import ShardedDocuments, read_manifest, rebuild_command

        try:
            return ShardedDocuments(prepared, split, verify=False)
        except SafetensorError as exc:
            manifest, bad, why = read_manifest(prepared), f"a {split} shard", exc
            for entry in (e for e in manifest["shards"] if e["split"] == split):
                try:
                    safe_open(str(prepared / entry["name"]), framework="pt")
                except SafetensorError as error:
                    bad, why = f"shard {entry['name']}", error
                    break
            raise ShardError(
                f"{bad} of data.prepared_dir {prepared} cannot be read ({why}); it is truncated or corrupted "
                f"(data.verify_checksums true checks every shard); rebuild it with: {rebuild_command(manifest, prepared)}"
            ) from None

    def _check_one_step_fits(self, prepared: Path) -> None:
        """The training split must hold one optimizer step's documents (the last incomplete step of
        an epoch is dropped): a ConfigError naming the loop keys, before anything costly."""
        loop = self.cfg.loop
        needed = loop.micro_batch_documents * loop.grad_accum_steps * self.world
        if len(self.train_docs) < needed:
            raise ConfigError(
                f"the training split of data.prepared_dir {prepared} has {len(self.train_docs)} documents, fewer than "
                f"one optimizer step takes: loop.micro_batch_documents {loop.micro_batch_documents} x "
                f"loop.grad_accum_steps {loop.grad_accum_steps} x {self.world} process(es) = {needed}; lower them, "
                "or prepare a larger corpus"
            )

    def _check_documents_fit(self, prepared: Path, mcfg) -> None:
        """Every prepared document (its sentences, end sentence included) must fit the model's
        positions: a ConfigError naming both settings and the fixes, instead of the first step's
        traceback. (Config validation checks data.max_sentences, but a complete preparation is
        used with the max_sentences it was made with.)"""
        longest = max(self.train_docs.longest_document(), self.eval_docs.longest_document())
        if longest > mcfg.max_seq_len:
            made_with = self.train_docs.manifest["options"]["max_sentences"]
            raise ConfigError(
                f"data.prepared_dir {prepared} holds documents of up to {longest} sentences (prepared with "
                f"data.max_sentences {made_with}, plus the end sentence) but the model has max_seq_len "
                f"{mcfg.max_seq_len} positions (model.preset {self.cfg.model.preset!r}); set "
                f"model.overrides.max_seq_len {longest}, or prepare the data again in another data.prepared_dir with "
                f"data.max_sentences {mcfg.max_seq_len - 1}"
            )

    def _check_prepared_matches(self, manifest: dict) -> None:
        """A complete preparation is used as it is: the data options the configuration sets (the
        config file or the command line, not the defaults) must be the ones it was prepared with,
        or the run is refused in one line naming the key."""
        options, prepared = manifest["options"], self.cfg.data.prepared_dir
        source = self.cfg.data.source
        if source and options.get("source") != str(Path(source).resolve()):
            raise ConfigError(
                f"data.prepared_dir {prepared} holds data prepared from {options.get('source')}, "
                f"not data.source {source}; choose another data.prepared_dir"
            )
        for key, value in _prepared_with(manifest).items():
            configured = getattr(self.cfg.data, key.partition(".")[2])
            if key in self.explicit and not _same_setting(configured, value):
                raise ConfigError(
                    f"{key} is {configured!r} but data.prepared_dir {prepared} was prepared with {value!r}; set "
                    f"{key} {value}, or choose another data.prepared_dir to prepare the data with {configured!r}"
                )
