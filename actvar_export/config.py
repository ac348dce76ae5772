"""Static configuration of VAR / ActVAR models (design file §1 and §2)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from .errors import ActVarError

PATCH_NUMS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
NUM_SCALES = len(PATCH_NUMS)
SCALE_LENS = tuple(pn * pn for pn in PATCH_NUMS)
SCALE_BEGIN = tuple(sum(SCALE_LENS[:i]) for i in range(NUM_SCALES))
TOTAL_TOKENS = sum(SCALE_LENS)  # 680
VOCAB = 4096
CVAE = 32
NUM_CLASSES = 1000
# Phi (quant_resi) index used at each scale: argmin over ticks linspace(1/12, 11/12, 4) of |tick - si/9|
PHI_INDEX = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
OFFICIAL_DEPTHS = (16, 20, 24, 30)
TOPK_LIMIT_TRT = 3840  # TensorRT's TopK accepts k <= 3840


@dataclass(frozen=True)
class VarConfig:
    depth: int
    vocab: int = VOCAB
    cvae: int = CVAE
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        if not 1 <= self.depth <= 64:
            raise ActVarError(f"invalid depth {self.depth}: expected 1..64 (official models: 16, 20, 24, 30)")

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return 64


@dataclass(frozen=True)
class ActVarConfig:
    """Dynamic activation settings. Static top-k sizes derive from these and are fixed at build time."""
    num_experts: int = 16
    expert_ratio: float = 0.75
    token_ratio: float = 0.75
    active_scales: Tuple[int, ...] = (8, 9)

    def __post_init__(self):
        object.__setattr__(self, "active_scales", tuple(sorted(int(s) for s in self.active_scales)))
        if self.num_experts < 1:
            raise ActVarError(f"invalid number of experts {self.num_experts}: must be >= 1")
        for name in ("expert_ratio", "token_ratio"):
            r = getattr(self, name)
            if not (isinstance(r, (int, float)) and 0.0 < r <= 1.0):
                raise ActVarError(f"invalid {name.replace('_', ' ')} {r!r}: must be in (0, 1]")
        for s in self.active_scales:
            if not 0 <= s < NUM_SCALES:
                raise ActVarError(f"invalid active scale {s}: scales are 0..{NUM_SCALES - 1}")
        if len(set(self.active_scales)) != len(self.active_scales):
            raise ActVarError(f"duplicate active scales {self.active_scales}")

    @property
    def k_w(self) -> int:
        return min(self.num_experts, math.ceil(self.expert_ratio * self.num_experts - 1e-9))

    def k_t(self, si: int) -> int:
        n = SCALE_LENS[si]
        if si not in self.active_scales:
            return n
        return min(n, math.ceil(self.token_ratio * n - 1e-9))

    def is_active(self, si: int) -> bool:
        return si in self.active_scales

    def static_sizes(self) -> dict:
        return {
            "k_w": self.k_w,
            "k_t": [self.k_t(si) for si in range(NUM_SCALES)],
            "cache_len": [cache_len_after(self, si) for si in range(NUM_SCALES)],
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["active_scales"] = list(self.active_scales)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActVarConfig":
        known = {"num_experts", "expert_ratio", "token_ratio", "active_scales"}
        unknown = set(d) - known
        if unknown:
            raise ActVarError(f"unknown ActVAR setting(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "active_scales" else v) for k, v in d.items()})


def cache_len_after(act: Optional[ActVarConfig], si: int) -> int:
    """Keys/values held per block once scale si has run (each scale appends K_t(si) entries)."""
    if act is None:
        return SCALE_BEGIN[si] + SCALE_LENS[si]
    return sum(act.k_t(s) for s in range(si + 1))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the reference: the VAR shape and optional ActVAR settings."""
    var: VarConfig
    actvar: Optional[ActVarConfig] = None

    @property
    def is_actvar(self) -> bool:
        return self.actvar is not None
