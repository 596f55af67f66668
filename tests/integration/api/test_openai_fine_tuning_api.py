"""The official `openai` SDK's fine-tuning API against a live tuneforge (no train worker: jobs stay queued;
the end-to-end run is tests/e2e/test_openai_sdk.py)."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from app.db import FinetuningJob
from app.db.session import transaction
from app.services import jobs
from app.services.openai_jobs import get as get_openai_job

BASE = "tiny-random-llama"
SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": word}]}
    for word in ("red", "green", "blue", "cyan")
]
DPO_ROWS = [
    {
        "input": {"messages": [{"role": "user", "content": f"Name a {thing}"}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }
    for thing, good, bad in (("colour", "red", "seven"), ("number", "seven", "red"), ("pet", "cat", "rock"))
]


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def client(live_server, live_token: str) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=live_token, max_retries=0)


def upload(client: openai.OpenAI, rows: list[dict[str, object]]) -> str:
    created = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(rows))), purpose="fine-tune")
    assert created.status == "processed", created
    return created.id


def test_create_an_sft_job_and_read_it_back(client: openai.OpenAI) -> None:
    file_id = upload(client, SFT_ROWS)
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=file_id,
        suffix="colours",
        seed=7,
        metadata={"team": "search", "ticket": "ML-42"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}
            },
        },
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.status, job.model, job.training_file, job.seed) == ("queued", BASE, file_id, 7)
    assert job.fine_tuned_model is None and job.error is None and job.validation_file is None
    assert job.user_provided_suffix == "colours" and job.result_files == []
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2
    assert job.hyperparameters.learning_rate_multiplier == 0.5
    assert job.method is not None and job.method.type == "supervised"
    assert job.metadata == {"team": "search", "ticket": "ML-42"}
    assert client.fine_tuning.jobs.retrieve(job.id) == job


def test_legacy_hyperparameters_and_auto(client: openai.OpenAI) -> None:
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=upload(client, SFT_ROWS),
        hyperparameters={"n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto"},
    )
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.user_provided_suffix is None


def test_create_a_dpo_job_on_a_preference_file(client: openai.OpenAI) -> None:
    file_id = upload(client, DPO_ROWS)
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=file_id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
    )
    assert job.status == "queued" and job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2


def test_dpo_on_a_chat_file_is_a_400_naming_the_fix(client: openai.OpenAI) -> None:
    sft = upload(client, SFT_ROWS)
    with pytest.raises(openai.BadRequestError, match="preferred_output") as raised:
        client.fine_tuning.jobs.create(model=BASE, training_file=sft, method={"type": "dpo"})
    assert raised.value.body["param"] == "training_file"  # type: ignore[index]
    assert "'supervised'" in raised.value.message


def test_supervised_on_a_preference_file_is_a_400_naming_the_fix(client: openai.OpenAI) -> None:
    dpo = upload(client, DPO_ROWS)
    with pytest.raises(openai.BadRequestError, match="'dpo'") as raised:
        client.fine_tuning.jobs.create(model=BASE, training_file=dpo)
    assert raised.value.body["param"] == "training_file"  # type: ignore[index]


def test_a_validation_file_holds_the_jobs_evaluation_rows(
    client: openai.OpenAI, live_server, live_token: str
) -> None:  # type: ignore[no-untyped-def]
    training, held_out = upload(client, SFT_ROWS), upload(client, SFT_ROWS[:2])
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=training,
        validation_file=held_out,
        hyperparameters={"n_epochs": 1, "batch_size": 1},
    )
    assert (job.training_file, job.validation_file) == (training, held_out)
    assert client.fine_tuning.jobs.retrieve(job.id) == job
    with transaction(live_server.app.state.ctx.sessions) as session:
        from app.services import auth

        row = get_openai_job(session, auth.authenticate(session, live_token), job.id)
        # Every training row trains (none is held out of them): 4 rows at batch size 1.
        assert row.total_steps == len(SFT_ROWS)
        assert row.eval_dataset_id is not None and row.eval_dataset_name


PROMPT_ROWS = [{"prompt": "Say red", "completion": "red"}]
SPLIT_ROWS = [{**row, "split": "train"} for row in SFT_ROWS]


@pytest.mark.parametrize(
    ("training_rows", "validation_rows", "expected"),
    [
        (SFT_ROWS, PROMPT_ROWS, "give the validation rows the training file's columns"),
        (SFT_ROWS, DPO_ROWS, "method 'supervised' trains on rows with"),
        (SPLIT_ROWS, SFT_ROWS, "has a 'split' column"),
        (SFT_ROWS, SPLIT_ROWS, "has a 'split' column"),
        (SFT_ROWS, None, "is the training file"),
    ],
)
def test_a_validation_file_that_cannot_be_held_out_is_a_400_naming_it(
    client: openai.OpenAI,
    training_rows: list[dict[str, object]],
    validation_rows: list[dict[str, object]] | None,
    expected: str,
) -> None:
    training = upload(client, training_rows)
    held_out = upload(client, validation_rows) if validation_rows is not None else training
    with pytest.raises(openai.BadRequestError, match=expected) as raised:
        client.fine_tuning.jobs.create(model=BASE, training_file=training, validation_file=held_out)
    assert raised.value.body["param"] == "validation_file"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
        ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),  # OpenAI's bound: 16 pairs
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"suffix": "has space"}, "suffix"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, SFT_ROWS), **extra)  # type: ignore[arg-type]
    assert raised.value.body["param"] == param, raised.value.body  # type: ignore[index]


def test_an_unknown_file_or_model(client: openai.OpenAI, live_server, live_token: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as raised:
        client.fine_tuning.jobs.create(model=BASE, training_file="file-" + "0" * 32)
    assert raised.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as raised:
        client.fine_tuning.jobs.create(
            model=BASE, training_file=upload(client, SFT_ROWS), validation_file="file-0123"
        )
    assert raised.value.body["param"] == "validation_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="not available") as raised:
        client.fine_tuning.jobs.create(
            model="no-such-model", training_file=upload(client, SFT_ROWS), suffix="never-made"
        )
    assert raised.value.body["param"] == "model"  # type: ignore[index]
    repo = httpx.get(
        f"{live_server.url}/v2/repos/never-made", headers={"Authorization": f"Bearer {live_token}"}
    )
    assert repo.status_code == 404  # a refused request leaves no repo behind
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_list_pages_newest_first_and_cancel(client: openai.OpenAI) -> None:
    file_id = upload(client, SFT_ROWS)
    ids = [client.fine_tuning.jobs.create(model=BASE, training_file=file_id).id for _ in range(3)]
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[:0:-1] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]
    cancelled = client.fine_tuning.jobs.cancel(ids[0])
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(ids[0])


def test_list_filters_on_metadata(client: openai.OpenAI) -> None:
    file_id = upload(client, SFT_ROWS)
    tagged = [{"team": "a", 'odd "key"': "1"}, {"team": "b"}, {"team": "a", 'odd "key"': "2"}, None]
    ids = [
        client.fine_tuning.jobs.create(model=BASE, training_file=file_id, metadata=labels).id  # type: ignore[arg-type]
        for labels in tagged
    ]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [ids[2], ids[0]]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={'odd "key"': "1"})] == [ids[0]]
    assert not client.fine_tuning.jobs.list(metadata={"team": "a", 'odd "key"': "3"}).data
    page = client.fine_tuning.jobs.list(metadata={"team": "a"}, limit=1)
    assert [j.id for j in page.data] == [ids[2]] and page.has_more
    after = client.fine_tuning.jobs.list(metadata={"team": "a"}, after=ids[2], limit=1)
    assert [j.id for j in after.data] == [ids[0]] and not after.has_more
    with pytest.raises(openai.BadRequestError) as raised:
        client.fine_tuning.jobs.list(metadata={"k" * 65: "v"})
    assert raised.value.body["param"] == "metadata"  # type: ignore[index]


def _record_progress(live_server, job_id: str, token: str) -> None:  # type: ignore[no-untyped-def]
    """What a worker reports: a step's metrics and a checkpoint, through the service it calls."""
    with transaction(live_server.app.state.ctx.sessions) as session:
        from app.services import auth

        job = get_openai_job(session, auth.authenticate(session, token), job_id)
        row = session.get(FinetuningJob, job.id)
        assert row is not None
        for step in (1, 2, 3):
            eval_loss = 1.5 if step == 2 else None
            jobs.record_metric(session, row, step, train_loss=2.0 / step, eval_loss=eval_loss)
        jobs.record_checkpoint(session, row, 2, f"tenants/x/checkpoints/{row.uuid}/2", {})


def test_events_and_checkpoints(client: openai.OpenAI, live_server, live_token: str) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, SFT_ROWS), suffix="ev")
    _record_progress(live_server, job.id, live_token)
    client.fine_tuning.jobs.cancel(job.id)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # the SDK follows `after`
    assert events[0].type == "message" and "cancelled" in events[0].message
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [3, 2, 1]  # type: ignore[index]
    assert metrics[1].data["valid_loss"] == 1.5 and metrics[0].data["train_loss"] == pytest.approx(2 / 3)  # type: ignore[index]
    assert len({e.id for e in events}) == len(events) and any("train queue" in e.message for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in checkpoints] == [(2, "ev/1@2")]
    assert checkpoints[0].metrics.valid_loss == 1.5 and checkpoints[0].fine_tuning_job_id == job.id


def test_another_tenants_job_is_not_found(live_server, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, SFT_ROWS))
    other = openai.OpenAI(
        base_url=live_server.url + "/v1", api_key=live_server.mint_token("t-other-jobs"), max_retries=0
    )
    for call in (other.fine_tuning.jobs.retrieve, other.fine_tuning.jobs.cancel):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.list_events(job.id)


def test_chat_with_a_model_nothing_can_serve_is_refused_naming_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="no-such-base-model") as raised:
        client.chat.completions.create(
            model="no-such-base-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="nothing/3", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="model"):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])


def test_models_lists_the_base_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert BASE in ids and "smollm2-135m" in ids
    assert client.models.retrieve(BASE).owned_by == "tuneforge"
    for unknown in ("gpt-17", "nothing/3", "nothing/3@5"):
        with pytest.raises(openai.NotFoundError, match="GET /v1/models lists"):
            client.models.retrieve(unknown)
