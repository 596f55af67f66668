"""`tuneforge.progress`: frames fold into one state without double counting, and the bar shows it."""

from __future__ import annotations

import io

from tuneforge.models import FinetuningJob, MetricsFrame
from tuneforge.progress import ProgressBar, TrainingProgress, format_loss, progress_postfix
from tuneforge.watcher import detach_message


def _frame(
    step: int | None,
    train: float | None = None,
    evaluation: float | None = None,
    *,
    status: str = "training",
    total: int = 4,
    completed: bool = False,
) -> MetricsFrame:
    return MetricsFrame.model_validate(
        {
            "data": {"steps": step, "train_metrics_loss": train, "validation_metrics_loss": evaluation},
            "meta": {"is_completed": completed, "status": status, "steps": step or 0, "total_steps": total},
        }
    )


def _job(status: str, steps_done: int, total_steps: int | None) -> FinetuningJob:
    return FinetuningJob.model_validate(
        {
            "uuid": "j-1",
            "baseModel": "tiny-random-llama",
            "targetRepoName": "r",
            "targetVersionTag": 1,
            "status": status,
            "stepsDone": steps_done,
            "totalSteps": total_steps,
        }
    )


def test_a_replayed_history_after_a_reconnect_changes_nothing() -> None:
    history = [_frame(1, 1.0), _frame(2, 0.8, 0.9), _frame(3, 0.6)]
    progress = TrainingProgress()
    for frame in history:
        progress.apply_frame(frame)
    before = TrainingProgress(**vars(progress))
    for frame in history:  # the reconnected stream starts from step 1 again
        assert progress.apply_frame(frame) is False
        assert progress == before
    assert (progress.steps, progress.train_loss, progress.eval_loss) == (3, 0.6, 0.9)


def test_an_eval_loss_sent_in_its_own_frame_for_the_same_step_is_kept() -> None:
    progress = TrainingProgress()
    progress.apply_frame(_frame(2, 0.8))
    assert progress.apply_frame(_frame(2, None, 0.95)) is True
    assert (progress.steps, progress.train_loss, progress.eval_loss) == (2, 0.8, 0.95)


def test_queued_frames_without_data_keep_zero_steps_and_no_total() -> None:
    progress = TrainingProgress()
    progress.apply_frame(
        MetricsFrame.model_validate({"data": None, "meta": {"status": "queued", "steps": 0}})
    )
    progress.apply_frame(_frame(None, status="queued", total=0))
    assert (progress.status, progress.steps, progress.total_steps, progress.completed) == (
        "queued",
        0,
        None,
        False,
    )


def test_the_completion_frame_marks_the_progress_completed() -> None:
    progress = TrainingProgress()
    progress.apply_frame(_frame(4, 0.5, status="completed", completed=True))
    assert progress.completed and progress.status == "completed" and progress.steps == 4


def test_a_polled_job_moves_steps_forward_only() -> None:
    progress = TrainingProgress()
    progress.apply_frame(_frame(3, 0.6))
    progress.apply_job(_job("training", 2, 4))  # an older poll answer
    assert (progress.status, progress.steps, progress.total_steps) == ("training", 3, 4)
    progress.apply_job(_job("completed", 4, 4))
    assert (progress.status, progress.steps, progress.train_loss) == ("completed", 4, 0.6)


def test_attaching_mid_run_takes_the_losses_from_the_replayed_history() -> None:
    progress = TrainingProgress()
    progress.apply_job(_job("training", 3, 4))  # the poll before the stream opens: no losses
    news = [progress.apply_frame(f) for f in (_frame(1, 1.0, 1.1), _frame(2, 0.8), _frame(3, 0.6))]
    assert news == [False, False, True]  # drawn once, when the replay catches up
    assert (progress.steps, progress.train_loss, progress.eval_loss) == (3, 0.6, 1.1)


def test_losses_show_four_decimals_or_dashes() -> None:
    assert (format_loss(None), format_loss(0.123456), format_loss(2)) == ("--", "0.1235", "2.0000")
    progress = TrainingProgress(train_loss=0.5, eval_loss=None)
    assert progress_postfix(progress) == "train_loss=0.5000, eval_loss=--, tok/s=--"


def test_tokens_per_second_come_from_the_newest_step_not_from_replayed_history() -> None:
    progress = TrainingProgress()
    for step, rate in ((2, 2500.4), (1, 90.0)):  # step 1 arrives late: replayed history
        progress.apply_frame(
            MetricsFrame.model_validate(
                {"data": {"steps": step, "tokens_per_second": rate}, "meta": {"total_steps": 4}}
            )
        )
    assert progress.tokens_per_second == 2500.4
    assert progress_postfix(progress).endswith("tok/s=2,500")


def test_the_bar_shows_status_steps_done_of_total_and_losses() -> None:
    out = io.StringIO()
    progress = TrainingProgress()
    bar = ProgressBar(progress, file=out)
    assert out.getvalue().strip().startswith("queued: ")
    for frame in (_frame(1, 1.25), _frame(3, 0.5)):
        progress.apply_frame(frame)
        bar.show(progress)
    bar.close()
    last_line = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last_line.startswith("training")
    assert "3/4" in last_line and "train_loss=0.5000, eval_loss=--" in last_line
    assert " elapsed, ETA " in last_line and "75%" in last_line


def test_a_state_already_on_screen_is_not_drawn_again() -> None:
    out = io.StringIO()
    progress = TrainingProgress()
    bar = ProgressBar(progress, file=out)
    progress.apply_frame(_frame(2, 0.5))
    bar.show(progress)
    drawn = out.getvalue()
    progress.apply_frame(_frame(1, 0.9))  # replayed history
    bar.show(progress)
    assert out.getvalue() == drawn
    bar.close()


def test_a_disabled_bar_writes_nothing() -> None:
    out = io.StringIO()
    progress = TrainingProgress()
    bar = ProgressBar(progress, enabled=False, file=out)
    progress.apply_frame(_frame(2, 0.5))
    bar.show(progress)
    bar.close()
    assert out.getvalue() == ""


def test_detaching_says_how_to_reattach_and_how_to_cancel() -> None:
    message = detach_message("j-1", "r/1")
    assert 'pb.finetuning.jobs.watch("j-1")' in message
    assert 'pb.finetuning.jobs.cancel("j-1")' in message and 'pb.adapters.cancel("r/1")' in message
    assert "tuneforge jobs watch j-1" in message and "tuneforge adapters cancel r/1" in message
    assert "keeps running" in message
