"""Training progress on the terminal: fold metrics frames and job polls into one state, draw it with tqdm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

from tqdm import tqdm

from tuneforge.models import FinetuningJob, MetricsFrame


@dataclass
class TrainingProgress:
    """What the progress bar shows about one job.

    Frames may repeat (a reconnected stream replays its history first): a frame older than the
    newest one seen (`frame_step`) changes nothing, so nothing counts twice. `steps` only moves
    forward, whether a frame or a poll moved it.
    """

    status: str = "queued"
    steps: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    completed: bool = False
    frame_step: int = -1

    def apply_frame(self, frame: MetricsFrame) -> bool:
        """Fold in one frame of the metrics stream; True if it changed what the bar should show.

        History behind the step count already shown is folded in (for its losses) but is not
        news: a watcher attaching to a long run would otherwise redraw once per past step.
        """
        data, meta = frame.data, frame.meta
        before, job_before = self.drawn(), (self.status, self.total_steps, self.completed)
        self.status = meta.status or self.status
        self.total_steps = meta.total_steps or self.total_steps
        self.completed = self.completed or meta.is_completed
        step = data.steps if data.steps is not None else meta.steps
        # Older than a frame already seen: replayed history. The steps a poll reported are not
        # compared here, so that history still brings in the losses a poll does not carry.
        if step is not None and step >= self.frame_step:
            self.frame_step = step
            # The eval loss of a step may come in a frame of its own, after the train loss.
            self.train_loss = _latest(data.train_metrics_loss, self.train_loss)
            self.eval_loss = _latest(data.validation_metrics_loss, self.eval_loss)
            self.tokens_per_second = _latest(data.tokens_per_second, self.tokens_per_second)
            if step < self.steps:
                return (self.status, self.total_steps, self.completed) != job_before
            self.steps = step
        return self.drawn() != before

    def apply_job(self, job: FinetuningJob) -> None:
        """Fold in a polled job (status and step count; a poll carries no losses)."""
        self.status = job.status
        if job.total_steps:
            self.total_steps = job.total_steps
        self.steps = max(self.steps, job.steps_done)

    def drawn(self) -> tuple[object, ...]:
        """The parts of the state that the bar draws."""
        return (
            self.status,
            self.steps,
            self.total_steps,
            self.train_loss,
            self.eval_loss,
            self.tokens_per_second,
        )


def _latest(value: float | None, previous: float | None) -> float | None:
    return previous if value is None else value


def format_loss(value: float | None) -> str:
    """A loss as the bar shows it: four decimals, or `--` when none was measured yet."""
    return "--" if value is None else f"{value:.4f}"


def format_rate(value: float | None) -> str:
    """Tokens per second as the bar shows them: whole numbers, or `--` before the first step."""
    return "--" if value is None else f"{value:,.0f}"


def progress_postfix(progress: TrainingProgress) -> str:
    """The text after the bar: the latest train and eval losses and the training throughput."""
    losses = f"train_loss={format_loss(progress.train_loss)}, eval_loss={format_loss(progress.eval_loss)}"
    return f"{losses}, tok/s={format_rate(progress.tokens_per_second)}"


# tqdm's layout with its estimate named: `<status>: 40%|####      | 4/10 [00:12 elapsed, ETA 00:18, ...]`.
# (Without a known total tqdm falls back to `4step [00:12, 0.33step/s, ...]`: no bar, no estimate.)
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}{postfix}]"
)


class ProgressBar:
    """A tqdm bar for one job: the status as its label, `steps done/total`, elapsed time and ETA, then the
    latest losses and tokens per second.

    Disabled, it draws nothing, so callers need not branch on `show_progress`.
    """

    def __init__(
        self, progress: TrainingProgress, *, enabled: bool = True, file: IO[str] | None = None
    ) -> None:
        # Started from the current state: tqdm draws once on creation, and a bar without a total
        # would flash a different layout first. miniters=1, mininterval=0: frames come at most once
        # per step, and each one should show.
        self._bar = tqdm(
            total=progress.total_steps,
            initial=progress.steps,
            desc=progress.status,
            postfix=progress_postfix(progress),
            unit="step",
            disable=not enabled,
            file=file,
            dynamic_ncols=True,
            bar_format=BAR_FORMAT,
            miniters=1,
            mininterval=0,
        )
        self._shown = progress.drawn()

    def show(self, progress: TrainingProgress) -> None:
        """Redraw the bar for the current state; a state already on screen is not drawn again."""
        if progress.drawn() == self._shown:
            return
        self._shown = progress.drawn()
        bar = self._bar
        if progress.total_steps and bar.total != progress.total_steps:
            bar.total = progress.total_steps
        bar.set_description_str(progress.status, refresh=False)
        bar.set_postfix_str(progress_postfix(progress), refresh=False)
        advanced = progress.steps - bar.n
        if advanced > 0:
            bar.update(advanced)  # keeps tqdm's rate and time-left estimates right; it redraws too
        else:
            bar.refresh()

    def close(self) -> None:
        """Leave the last state on screen and release the line; calling it twice is harmless."""
        self._bar.close()
