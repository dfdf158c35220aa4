"""The "triton" path of fused linear cross-entropy: one chunk of rows at a time, two schedules.

Both schedules hold one chunk of C x V logits in the input dtype (``chunk_mib`` of the tile
table; 256 MiB is 512 rows at V = 256,206 in bf16), compute the gradient while the chunk's
logits exist (two GEMM-equivalents for a frozen weight), accumulate in float32 and reduce
without atomics, so results are bit-identical from run to run. Kernels:
triton_kernels.py.

- "hybrid" (the default): cuBLAS writes the logits (``torch.mm``/``addmm`` into the chunk
  buffer); ``_flce_row_stats_kernel`` reads them once for per-segment softmax statistics,
  ``_flce_lse_kernel`` merges them into the log-sum-exp and the gradient coefficients,
  ``_flce_row_dz_kernel`` overwrites the logits with the logit gradient dz in place, and cuBLAS
  multiplies: ``dh = dz @ W`` (``dW += dz.T @ h`` into float32 when the weight is trainable).
  The GEMMs run at cuBLAS speed; the price is 6 bytes/logit of extra HBM traffic (two reads, one
  write). The logits are rounded to the input dtype, as in the reference and Liger-Kernel.
- "fused": both GEMMs in Triton. ``_flce_logits_kernel`` writes per-tile statistics and stores
  ``exp(logit - tile max)``; the hidden-gradient GEMM forms dz from it as its A operand is loaded,
  with one multiply (the scale ``alpha * exp(tile max - lse)`` per row and tile, formed in the
  frame of the row max as ``(alpha / s) * exp(tile max - max)``) instead of an exp.
  No extra pass over the logits, and the softmax is computed from float32 logits; its speed
  depends on Triton's GEMMs. On a GPU it runs 16-bit inputs (float32 always takes "hybrid":
  cuBLAS's float32 GEMMs are faster than Triton's full-precision float32 dot).

Which schedule runs, and with which tiles, comes from the tile table
``tiles.json`` beside this file (per GPU architecture and operand
size; ``bench/sweep_flce.py`` measures both schedules on a GPU and rewrites the table). Keeping
two schedules is temporary: once the table holds H200 measurements, the slower one is deleted.
Under ``TRITON_INTERPRET=1`` the same kernels run on the CPU (float32 only, large blocks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton

from sonarllm_kernels.fused_linear_cross_entropy import triton_kernels as K
from sonarllm_kernels._dispatch import compile_only, is_interpreter, multiprocessor_count
from sonarllm_kernels.fused_linear_cross_entropy.function import ChunkResult, FLCEParams

SCHEDULES = ("hybrid", "fused")
TILES_FILE = Path(__file__).with_name("tiles.json")

# Overrides for tests and the sweep (None: the tile table decides).
CHUNK_BYTES: int | None = None  # memory for one chunk of stored logits
SPLIT: int | None = None  # V-splits of the fused hidden-gradient GEMM
SCHEDULE: str | None = None  # "hybrid" or "fused", with the table's tiles for it
CONFIG: dict | None = None  # a whole configuration (see check_config), e.g. a sweep candidate

# The interpreter pays ~5 ms per program step whatever the tile size: big tiles, few programs.
_INTERP_CONFIGS = {
    "hybrid": dict(chunk_mib=256, BLOCK_V=16384, SEGMENT=1 << 30, num_warps=4),
    "fused": dict(
        chunk_mib=256,
        logits=dict(BLOCK_C=64, BLOCK_V=512, BLOCK_D=128, GROUP_C=8, num_warps=4, num_stages=1),
        grad=dict(BLOCK_C=64, BLOCK_K=512, BLOCK_D=128, waves=1, num_warps=4, num_stages=1),
        weight=dict(BLOCK_V=512, BLOCK_C=64, BLOCK_D=128, num_warps=4, num_stages=1),
    ),
}
_KEYS = {
    "hybrid": {"chunk_mib", "BLOCK_V", "SEGMENT", "num_warps"},
    "fused": {"chunk_mib", "logits", "grad", "weight"},
    "logits": {"BLOCK_C", "BLOCK_V", "BLOCK_D", "GROUP_C", "num_warps", "num_stages"},
    "grad": {"BLOCK_C", "BLOCK_K", "BLOCK_D", "waves", "num_warps", "num_stages"},
    "weight": {"BLOCK_V", "BLOCK_C", "BLOCK_D", "num_warps", "num_stages"},
}
ROW_ALIGN = 64  # the chunk buffer's row stride is a multiple of this many elements (aligned vectors)


def check_config(cfg: dict) -> dict:
    """Validate one configuration: ``{"schedule": "hybrid"|"fused", ...its keys}`` (raises ValueError)."""
    schedule = cfg.get("schedule")
    if schedule not in SCHEDULES:
        raise ValueError(f"FLCE tile config: schedule must be one of {SCHEDULES}, got {schedule!r}")

    def keys(d, kind):
        if not isinstance(d, dict) or set(d) - {"schedule"} != _KEYS[kind]:
            got = sorted(set(d) - {"schedule"}) if isinstance(d, dict) else d
            raise ValueError(f"FLCE tile config ({kind}) must have keys {sorted(_KEYS[kind])}, got {got}")

    keys(cfg, schedule)
    if schedule == "fused":
        for kind in ("logits", "grad", "weight"):
            keys(cfg[kind], kind)
        tile_v = cfg["logits"]["BLOCK_V"]
        for kind, key in (("grad", "BLOCK_K"), ("weight", "BLOCK_V")):
            if tile_v % cfg[kind][key]:
                raise ValueError(f"FLCE tile config: {kind}.{key} must divide logits.BLOCK_V ({tile_v})")
    elif cfg["SEGMENT"] < cfg["BLOCK_V"]:
        raise ValueError("FLCE tile config: SEGMENT must be at least BLOCK_V")
    return cfg


def load_tiles(path: Path = TILES_FILE) -> dict:
    """The tile table: ``{arch: {"measured": ..., "2"|"4": {"schedule": name, name: config}}}``."""
    table = json.loads(Path(path).read_text())
    for arch, entry in table.items():
        if arch.startswith("_"):
            continue
        for size, per in entry.items():
            if size == "measured":
                continue
            for name in SCHEDULES:
                if name in per:
                    check_config({"schedule": name, **per[name]})
            if per.get("schedule") not in per:
                raise ValueError(f"{path}: {arch}/{size}: schedule {per.get('schedule')!r} has no config")
    return table


_TILES = load_tiles()


def device_arch(device: torch.device) -> str:
    """The key of the tile table: 'sm_90' for an H100/H200. For CPU tensors standing in for CUDA
    ones (sonarllm_kernels.warmup's compile_only), the GPU that Triton compiles for; otherwise sm_90."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    if compile_only():
        from triton.runtime.driver import driver

        return f"sm_{driver.active.get_current_target().arch}"
    return "sm_90"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting (tf32 only when the user allows it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _padded(v: int) -> int:
    return triton.cdiv(v, ROW_ALIGN) * ROW_ALIGN


def _chunk_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, vocab] view of a buffer whose row stride is a multiple of ROW_ALIGN elements."""
    return torch.empty((rows, _padded(vocab)), dtype=dtype, device=device)[:, :vocab]


_ADDMM_OUT_DTYPE = True  # torch.addmm(..., out_dtype=float32) works here (CUDA, torch >= 2.8)


def _addmm_float32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with float32 ``acc`` and 16-bit ``a``, ``b`` (float32 accumulation)."""
    global _ADDMM_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _ADDMM_OUT_DTYPE:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE = False
    b32 = b.to(acc.dtype)
    step = max(1, (64 << 20) // max(1, a.shape[1] * 4))  # 64 MiB float32 blocks of a
    for r in range(0, a.shape[0], step):
        acc[r : r + step].addmm_(a[r : r + step].to(acc.dtype), b32)


def _block_weights(cw_V: torch.Tensor | None, vocab: int, blk_len: int, n_blocks: int, device) -> torch.Tensor:
    """The weight of each block of ``blk_len`` columns in the smoothing sum: the sum of its class
    weights, or its number of columns (float32 [n_blocks]). The merge moves each block's
    smoothing sum, kept relative to the block's max, to the row max with it."""
    w_V = cw_V.float() if cw_V is not None else torch.ones(vocab, dtype=torch.float32, device=device)
    padded = torch.zeros(n_blocks * blk_len, dtype=torch.float32, device=device)
    padded[:vocab] = w_V
    return padded.view(n_blocks, blk_len).sum(dim=1)


class TritonChunkBackend:
    """Per-chunk math in Triton and cuBLAS (see ChunkBackend in function).

    Args (each None: the module's override, else the tile table):
        chunk_bytes: memory for one chunk of stored logits.
        split: number of V-splits of the fused schedule's hidden-gradient GEMM.
        schedule: "hybrid" or "fused" (see the module docstring).
        config: a whole configuration (check_config), e.g. a candidate of bench/sweep_flce.py.
    """

    def __init__(self, chunk_bytes: int | None = None, split: int | None = None, schedule: str | None = None,
                 config: dict | None = None):  # fmt: skip
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.split = SPLIT if split is None else split
        self.schedule = SCHEDULE if schedule is None else schedule
        self.config = CONFIG if config is None else config
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self.interpret = is_interpreter()

    def resolve(self, dtype: torch.dtype, device: torch.device) -> dict:
        """The configuration a chunk of ``dtype`` on ``device`` runs with."""
        if self.config is not None:
            return check_config(self.config)
        if self.interpret:
            name = self.schedule or _TILES["default"]["4"]["schedule"]
            return {"schedule": name, **_INTERP_CONFIGS[name]}
        entry = _TILES.get(device_arch(device), _TILES["default"])[str(dtype.itemsize)]
        # A schedule the table has no tiles for at this size (fused at float32) falls back.
        name = self.schedule if self.schedule in entry else entry["schedule"]
        return {"schedule": name, **entry[name]}

    def chunk_rows(self, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        cfg = self.resolve(dtype, device)
        quantum = cfg["logits"]["BLOCK_C"] if cfg["schedule"] == "fused" else 64
        budget = self.chunk_bytes if self.chunk_bytes is not None else cfg["chunk_mib"] << 20
        rows = budget // max(1, _padded(vocab) * dtype.itemsize) // quantum * quantum
        return max(1, min(n_rows, max(quantum, rows)))

    def chunk(
        self,
        h_CD: torch.Tensor,
        w_VD: torch.Tensor,
        b_V: torch.Tensor | None,
        y_C: torch.Tensor,
        params: FLCEParams,
        *,
        cw_V: torch.Tensor | None,
        loss_scale_C: torch.Tensor | None,
        lse_scale_C: torch.Tensor | None,
        want_dh: bool,
        dw_acc_VD: torch.Tensor | None,
        db_acc_V: torch.Tensor | None,
    ) -> ChunkResult:
        cfg = self.resolve(h_CD.dtype, h_CD.device)
        run = self._hybrid if cfg["schedule"] == "hybrid" else self._fused
        return run(cfg, h_CD, w_VD, None if b_V is None else b_V.contiguous(), y_C.contiguous(), params,
                   cw_V=cw_V, loss_scale_C=None if loss_scale_C is None else loss_scale_C.float().contiguous(),
                   lse_scale_C=None if lse_scale_C is None else lse_scale_C.float().contiguous(),
                   want_dh=want_dh, dw_acc_VD=dw_acc_VD, db_acc_V=db_acc_V)  # fmt: skip

    # --- shared -------------------------------------------------------------------------------

    def _merge(self, blk_max, blk_sum, blk_zsum, blk_len, target, y_C, V, params, cw_V, loss_scale_C, lse_scale_C,
               write_scale):  # fmt: skip
        """Row max m, shifted lse' and smoothing sum, and the gradient coefficients from
        per-(row, block) statistics of blocks of ``blk_len`` columns; ``target`` (the target
        logit) is overwritten with target - m. The softmax's coefficient comes back as
        ``pscale = alpha / s`` (s = sum_j exp(z_j - m)); with ``write_scale`` blk_sum is
        overwritten with pscale * exp(block max - m)."""
        C, NB = blk_max.shape
        f32 = dict(dtype=torch.float32, device=blk_max.device)
        row_max, lse = torch.empty(C, **f32), torch.empty(C, **f32)
        smoothing = blk_zsum is not None
        zsum = torch.empty(C, **f32) if smoothing else lse
        blk_weight = _block_weights(cw_V, V, blk_len, NB, blk_max.device) if smoothing else lse
        pscale, beta, gamma = (torch.empty(C, **f32) for _ in range(3))
        has_cw = cw_V is not None
        row_weight_C = cw_V[y_C].contiguous() if has_cw else lse
        weight_sum = cw_V.sum().reshape(1) if has_cw else lse
        BLOCK_R = 16
        block_t = triton.next_power_of_2(NB) if self.interpret else min(256, triton.next_power_of_2(NB))
        K._flce_lse_kernel[(triton.cdiv(C, BLOCK_R),)](
            blk_max, blk_sum, blk_zsum if smoothing else blk_sum, blk_weight,
            loss_scale_C if loss_scale_C is not None else lse, lse_scale_C if lse_scale_C is not None else lse,
            row_weight_C, weight_sum, target,
            row_max, lse, zsum, pscale, beta, gamma, blk_sum,
            C, NB, blk_max.stride(0), V,
            params.z_loss, params.label_smoothing,
            HAS_SMOOTHING=smoothing, HAS_LOSS_SCALE=loss_scale_C is not None,
            HAS_LSE_SCALE=lse_scale_C is not None, HAS_CLASS_WEIGHT=has_cw, WRITE_SCALE=write_scale,
            BLOCK_R=BLOCK_R, BLOCK_T=block_t,
        )  # fmt: skip
        return row_max, lse, (zsum if smoothing else None), pscale, beta, gamma

    # --- "hybrid": cuBLAS GEMMs, Triton row passes --------------------------------------------

    def _hybrid(self, cfg, h_CD, w_VD, b_V, y_C, params, *, cw_V, loss_scale_C, lse_scale_C, want_dh, dw_acc_VD,
                db_acc_V):  # fmt: skip
        C, V = h_CD.shape[0], w_VD.shape[0]
        grad = loss_scale_C is not None or lse_scale_C is not None
        smoothing = params.label_smoothing > 0
        cw_smoothing = cw_V is not None and smoothing  # the row kernels read class weights only for smoothing
        softcap = params.softcap if params.softcap is not None else 1.0
        f32 = dict(dtype=torch.float32, device=h_CD.device)

        gemms = not compile_only()  # CPU tensors standing in for CUDA ones: only Triton launches count
        z_CV = _chunk_buffer(C, V, h_CD.dtype, h_CD.device)
        if gemms and b_V is None:
            torch.mm(h_CD, w_VD.t(), out=z_CV)
        elif gemms:
            torch.addmm(b_V, h_CD, w_VD.t(), out=z_CV)

        block_v = cfg["BLOCK_V"]
        n_seg = triton.cdiv(V, cfg["SEGMENT"])
        n_iter = triton.cdiv(triton.cdiv(V, n_seg), block_v)  # every program runs the same trip count
        seg_len = n_iter * block_v
        n_seg = triton.cdiv(V, seg_len)
        blk_max, blk_sum = torch.empty((C, n_seg), **f32), torch.empty((C, n_seg), **f32)
        blk_zsum = torch.empty((C, n_seg), **f32) if smoothing else None
        target = torch.empty(C, **f32)
        flags = dict(HAS_SOFTCAP=params.softcap is not None, HAS_CLASS_WEIGHT=cw_smoothing, BLOCK_V=block_v,
                     num_warps=cfg["num_warps"])  # fmt: skip
        cw_arg = cw_V if cw_V is not None else target
        K._flce_row_stats_kernel[(C, n_seg)](
            z_CV, cw_arg, y_C, blk_max, blk_sum, blk_zsum if smoothing else blk_sum, target,
            V, seg_len, n_iter, z_CV.stride(0), n_seg, softcap, HAS_SMOOTHING=smoothing, **flags,
        )  # fmt: skip
        row_max, lse, zsum, pscale, beta, gamma = self._merge(blk_max, blk_sum, blk_zsum, seg_len, target, y_C, V,
                                                              params, cw_V, loss_scale_C, lse_scale_C,
                                                              write_scale=False)  # fmt: skip
        dh_CD = None
        if grad:
            K._flce_row_dz_kernel[(C, n_seg)](
                z_CV, cw_arg, y_C, row_max, pscale, beta, gamma,
                V, seg_len, n_iter, z_CV.stride(0), softcap, HAS_GAMMA=smoothing, **flags,
            )  # fmt: skip
            if want_dh:
                dh_CD = torch.mm(z_CV, w_VD) if gemms else torch.empty_like(h_CD)
            if dw_acc_VD is not None and gemms:
                _addmm_float32(dw_acc_VD, z_CV.t(), h_CD)
            if db_acc_V is not None and gemms:
                db_acc_V += z_CV.sum(dim=0, dtype=db_acc_V.dtype)
        return ChunkResult(row_max, lse, target, zsum, dh_CD)

    # --- "fused": both GEMMs in Triton ---------------------------------------------------------

    def _fused(self, cfg, h_CD, w_VD, b_V, y_C, params, *, cw_V, loss_scale_C, lse_scale_C, want_dh, dw_acc_VD,
               db_acc_V):  # fmt: skip
        C, D = h_CD.shape
        V = w_VD.shape[0]
        dev = h_CD.device
        grad = loss_scale_C is not None or lse_scale_C is not None
        smoothing = params.label_smoothing > 0
        cw_smoothing = cw_V is not None and smoothing
        softcap = params.softcap if params.softcap is not None else 1.0
        precision = _dot_precision(h_CD.dtype)
        exact_exp = h_CD.dtype == torch.float32  # a 16-bit store of exp(z - tile max) rounds more than exp2 errs
        f32 = dict(dtype=torch.float32, device=dev)
        lc = cfg["logits"]
        tile_v = lc["BLOCK_V"]
        NT = triton.cdiv(V, tile_v)

        tile_max, tile_sum = torch.empty((C, NT), **f32), torch.empty((C, NT), **f32)
        tile_zsum = torch.empty((C, NT), **f32) if smoothing else None
        target = torch.empty(C, **f32)
        e_CV = _chunk_buffer(C, V, h_CD.dtype, dev) if grad else target
        cw_arg = cw_V if cw_V is not None else target
        K._flce_logits_kernel[(triton.cdiv(C, lc["BLOCK_C"]) * NT,)](
            h_CD, w_VD, b_V if b_V is not None else target, cw_arg, y_C,
            e_CV, tile_max, tile_sum, tile_zsum if smoothing else tile_sum, target,
            C, V, D,
            h_CD.stride(0), h_CD.stride(1), w_VD.stride(0), w_VD.stride(1), e_CV.stride(0) if grad else 0, NT,
            softcap,
            HAS_BIAS=b_V is not None, HAS_SOFTCAP=params.softcap is not None, HAS_SMOOTHING=smoothing,
            HAS_CLASS_WEIGHT=cw_smoothing, STORE=grad, UPCAST=self.interpret, DOT_PRECISION=precision,
            EXACT_EXP=exact_exp, **lc,
        )  # fmt: skip
        row_max, lse, zsum, _, beta, gamma = self._merge(tile_max, tile_sum, tile_zsum, tile_v, target, y_C, V, params,
                                                         cw_V, loss_scale_C, lse_scale_C, write_scale=grad)  # fmt: skip
        scale = tile_sum  # (alpha / s) * exp(tile max - m), written by the merge
        dh_CD = None
        if grad:
            common = dict(HAS_SOFTCAP=params.softcap is not None, HAS_GAMMA=smoothing, HAS_CLASS_WEIGHT=cw_smoothing,
                          UPCAST=self.interpret, DOT_PRECISION=precision, EXACT_EXP=exact_exp,
                          TILE_V=tile_v)  # fmt: skip
            if want_dh:
                gc = dict(cfg["grad"])
                waves = gc.pop("waves")
                n_tiles = triton.cdiv(C, gc["BLOCK_C"]) * triton.cdiv(D, gc["BLOCK_D"])
                n_kblocks = triton.cdiv(V, gc["BLOCK_K"])
                split = self.split
                if split is None:
                    split = 1 if self.interpret else waves * multiprocessor_count(dev) // n_tiles
                n_k = triton.cdiv(n_kblocks, max(1, min(split, n_kblocks)))
                split = triton.cdiv(n_kblocks, n_k)
                part = torch.empty((split, C, D), **f32)
                K._flce_grad_hidden_kernel[(n_tiles, split)](
                    e_CV, scale, tile_max, w_VD, cw_arg, y_C, beta, gamma, part,
                    C, V, D, n_k,
                    e_CV.stride(0), NT, w_VD.stride(0), w_VD.stride(1),
                    softcap, **common, **gc,
                )  # fmt: skip
                dh_CD = (part[0] if split == 1 else part.sum(dim=0)).to(h_CD.dtype)
            if dw_acc_VD is not None or db_acc_V is not None:
                wc = cfg["weight"]
                n_d = triton.cdiv(D, wc["BLOCK_D"]) if dw_acc_VD is not None else 1
                K._flce_grad_weight_kernel[(triton.cdiv(V, wc["BLOCK_V"]) * n_d,)](
                    e_CV, scale, tile_max, h_CD, cw_arg, y_C, beta, gamma,
                    dw_acc_VD if dw_acc_VD is not None else target, db_acc_V if db_acc_V is not None else target,
                    C, V, D,
                    e_CV.stride(0), NT, h_CD.stride(0), h_CD.stride(1),
                    softcap, HAS_DW=dw_acc_VD is not None, HAS_DB=db_acc_V is not None, **common, **wc,
                )  # fmt: skip
        return ChunkResult(row_max, lse, target, zsum, dh_CD)
