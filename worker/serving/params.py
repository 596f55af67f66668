"""Per-request sampling parameters, validated once at the edge so the engine loop never sees bad values."""

from __future__ import annotations

from dataclasses import dataclass

from worker.serving.errors import InvalidParameterError

# Stop strings longer than this would make every streamed token wait for the hold-back window.
MAX_STOP_LENGTH = 256
MAX_STOP_SEQUENCES = 8


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. `temperature == 0` (or `do_sample=False`) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; CTRL-style, as HF and LoRAX apply it
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    do_sample: bool = True  # LoRAX's switch; False forces greedy whatever the temperature

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        _check(self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)")
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1.0 turns it off)")
        _check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} sequences")
        for s in self.stop:
            _check(
                0 < len(s) <= MAX_STOP_LENGTH, "stop", f"each stop string needs 1..{MAX_STOP_LENGTH} chars"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{field} {message}", field=field)
