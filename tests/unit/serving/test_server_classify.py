"""LoRAX's `/classify` and `/classify_batch` against a live server: classification adapters (a LoRA plus a
`score` head, as task 'classification' saves them) beside plain LoRAs and the base model, answered as the
training-side model answers, and the bounds and refusals of both routes."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from engine_support import make_engine
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from server_support import TINY, LiveServingServer
from tests_support import write_classifier_adapter
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CLASSIFIER_LABELS
from tuneforge.rules.classifier import encode_labels

from worker.serving.adapters import LocalDirectorySource
from worker.serving.embedding import EmbeddingJob, EmbeddingResult
from worker.serving.errors import ServingError
from worker.serving.params import MAX_CLASSIFY_INPUTS
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant
from worker.serving.vllm_engine.engine import VllmEngine
from worker.serving.vllm_engine.process import VllmConfig
from worker.training.classification import LabelledText, make_label_batch, pooled_logits

TEXTS = ["Once upon a time", "the quick brown fox jumps", "hello", "a good day"]
LABELS = {"acme/11": ["neg", "pos"], "acme/12": ["0", "1", "10"]}


def make_classifier(base_dir: Path, out_dir: Path, labels: list[str], seed: int) -> Path:
    """A SEQ_CLS LoRA with random A, B and head (so it differs from the base), and its label file."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), dtype=torch.float32
    )
    lora = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * (0.5 if "score" in name else 0.1))
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / CLASSIFIER_LABELS).write_text(encode_labels(labels))
    return out_dir


def reference(base_dir: Path, adapter_dir: Path, texts: list[str]) -> torch.Tensor:
    """The training side's probabilities: PEFT's classifier, pooled as worker/training/classification.py."""
    labels = json.loads((adapter_dir / CLASSIFIER_LABELS).read_text())["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), dtype=torch.float32, attn_implementation="eager"
    )
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [LabelledText(list(ids), 0) for ids in tokenizer(texts)["input_ids"]]
    with torch.no_grad():
        logits = pooled_logits(peft_model.get_base_model(), make_label_batch(examples, 0))
    return torch.softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classifiers")
    for seed, (adapter_id, labels) in enumerate(LABELS.items()):
        make_classifier(tiny_model_dir, root / adapter_id, labels, seed=seed + 7)
    shutil.copytree(adapter_root / "acme/1", root / "acme/1")  # a plain LoRA
    write_classifier_adapter(root / "plain/1")  # the torch-free writer the fuzz run's classifier comes from
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, root: Path) -> Iterator[LiveServingServer]:
    with LiveServingServer(tiny_model_dir, root, max_model_len=64) as live:
        yield live


def _probabilities(answers: list[list[dict[str, object]]]) -> torch.Tensor:
    return torch.tensor([[s["score"] for s in a[0]["scores"]] for a in answers])  # type: ignore[index,union-attr]


def test_classify_batch_matches_the_training_side_model(
    server: LiveServingServer, tiny_model_dir: Path, root: Path
) -> None:
    for adapter_id, labels in LABELS.items():
        response = httpx.post(
            f"{server.url}/classify_batch", json={"inputs": TEXTS, "adapter_id": adapter_id}, timeout=60
        )
        assert response.status_code == 200, response.text
        answers = response.json()
        assert [[s["label"] for s in a[0]["scores"]] for a in answers] == [labels] * len(TEXTS)
        expected = reference(tiny_model_dir, root / adapter_id, TEXTS)
        torch.testing.assert_close(_probabilities(answers), expected, atol=1e-4, rtol=1e-4)
        for text, [entity], row in zip(TEXTS, answers, expected, strict=True):
            # LoRAX's entity, spanning the whole text: the best label and its probability.
            assert entity["entity_group"] == labels[int(row.argmax())]
            assert entity["score"] == pytest.approx(float(row.max()), abs=1e-4)
            assert (entity["word"], entity["start"], entity["end"]) == (text, 0, len(text))


def test_the_torch_free_classifier_of_the_fuzz_run_matches_the_training_side_model(
    server: LiveServingServer, tiny_model_dir: Path, root: Path
) -> None:
    response = httpx.post(f"{server.url}/classify_batch", json={"inputs": TEXTS, "adapter_id": "plain/1"})
    assert response.status_code == 200, response.text
    expected = reference(tiny_model_dir, root / "plain/1", TEXTS)
    torch.testing.assert_close(_probabilities(response.json()), expected, atol=1e-4, rtol=1e-4)


def test_classify_one_text_with_adapter_id_in_parameters(server: LiveServingServer) -> None:
    one = httpx.post(
        f"{server.url}/classify", json={"inputs": TEXTS[1], "parameters": {"adapter_id": "acme/11"}}
    )
    batch = httpx.post(f"{server.url}/classify_batch", json={"inputs": TEXTS, "adapter_id": "acme/11"})
    assert one.status_code == 200
    [entity], [in_batch] = one.json(), batch.json()[1]
    assert entity["entity_group"] == in_batch["entity_group"]
    assert entity["score"] == pytest.approx(in_batch["score"], abs=1e-5)


def test_the_answers_are_lorax_client_types(server: LiveServingServer) -> None:
    """lorax-client reads a /classify answer as its ClassifyResponse (a list of entities) and a
    /classify_batch answer as one per text. Its `classify` sends no adapter, and a generative base has no
    classification head: it raises the 400 that says to name one."""
    from lorax import Client
    from lorax.errors import ValidationError
    from lorax.types import ClassifyResponse

    one = httpx.post(f"{server.url}/classify", json={"inputs": TEXTS[0], "adapter_id": "acme/11"})
    batch = httpx.post(f"{server.url}/classify_batch", json={"inputs": TEXTS, "adapter_id": "acme/11"})
    [entity] = ClassifyResponse(entities=one.json()).entities or []
    assert entity["entity_group"] in LABELS["acme/11"] and 0 < entity["score"] <= 1
    assert [len(ClassifyResponse(entities=e).entities or []) for e in batch.json()] == [1] * len(TEXTS)
    with pytest.raises(ValidationError, match="adapter_id"):  # its class for an error_type 'validation'
        Client(server.url).classify(TEXTS[0])


def test_two_classifiers_and_embeddings_share_the_engine_in_one_mixed_load(
    server: LiveServingServer, tiny_model_dir: Path, root: Path
) -> None:
    """Requests for both classifiers and the base model's embeddings at once: each gets its own answer."""

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            calls = [
                client.post("/classify_batch", json={"inputs": TEXTS, "adapter_id": adapter_id})
                for adapter_id in (*LABELS, *LABELS)
            ]
            calls.append(client.post("/embed", json={"inputs": TEXTS[0]}))
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for response, adapter_id in zip(responses, (*LABELS, *LABELS), strict=False):
        expected = reference(tiny_model_dir, root / adapter_id, TEXTS)
        torch.testing.assert_close(_probabilities(response.json()), expected, atol=1e-4, rtol=1e-4)
    assert len(responses[-1].json()["embeddings"]) == 64


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/classify", {"inputs": "", "adapter_id": "acme/11"}, 422, "inputs"),
        ("/classify_batch", {"inputs": [], "adapter_id": "acme/11"}, 422, "inputs"),
        ("/classify_batch", {"inputs": ["a", ""], "adapter_id": "acme/11"}, 422, "inputs"),
        ("/classify_batch", {"inputs": ["a"] * (MAX_CLASSIFY_INPUTS + 1), "adapter_id": "acme/11"}, 422,
         "inputs"),
        ("/classify", {"inputs": "hi"}, 400, "classification adapter"),
        ("/classify", {"inputs": "hi", "adapter_id": TINY}, 400, "classification adapter"),
        ("/classify", {"inputs": "hi", "adapter_id": "acme/1"}, 400, "not a classification adapter"),
        ("/classify_batch", {"inputs": ["hi"], "adapter_id": "acme/1"}, 400, "/generate"),
        ("/classify", {"inputs": "hi", "adapter_id": "acme/99"}, 404, "acme/99"),
        ("/classify", {"inputs": "hi " * 100, "adapter_id": "acme/11"}, 400, "context"),
    ],
)  # fmt: skip
def test_bad_requests_fail_alone_naming_the_fix(
    server: LiveServingServer, path: str, body: dict[str, object], status: int, words: str
) -> None:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json())
    still = httpx.post(f"{server.url}/classify", json={"inputs": "hi", "adapter_id": "acme/11"})
    assert still.status_code == 200


def test_hostile_classifier_files_are_refused_with_a_clear_error(
    server: LiveServingServer, root: Path
) -> None:
    cases = {
        "acme/21": lambda d: (d / CLASSIFIER_LABELS).unlink(),
        "acme/22": lambda d: (d / CLASSIFIER_LABELS).write_text(encode_labels(["a", "b", "c"])),
        "acme/23": lambda d: (d / CLASSIFIER_LABELS).write_text('{"format": 1, "labels": [1, 2]}'),
        "acme/24": lambda d: _reshape_head(d, 65),
    }
    messages = {
        "acme/21": CLASSIFIER_LABELS,
        "acme/22": "3 labels",
        "acme/23": "labels",
        "acme/24": "hidden size",
    }
    for adapter_id, spoil in cases.items():
        shutil.copytree(root / "acme/11", root / adapter_id)
        spoil(root / adapter_id)
        response = httpx.post(f"{server.url}/classify", json={"inputs": "hi", "adapter_id": adapter_id})
        assert response.status_code == 422, (adapter_id, response.text)
        assert messages[adapter_id] in response.text, (adapter_id, response.text)


def _reshape_head(directory: Path, hidden: int) -> None:
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    name = next(n for n in tensors if n.endswith("score.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], hidden)
    save_file(tensors, directory / ADAPTER_WEIGHTS)
    assert json.loads((directory / ADAPTER_CONFIG).read_text())["task_type"] == "SEQ_CLS"


def test_the_vllm_engine_refuses_classification_naming_engine_tuneforge(
    tiny_model_dir: Path, root: Path, tmp_path: Path
) -> None:
    config = VllmConfig(python=tmp_path / "no-python", model_path=tiny_model_dir, model_name=TINY)
    engine = VllmEngine(config, LocalDirectorySource(root))
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # what start() reads before vLLM runs
    client = TestClient(build_app(engine, tenants=TrustedTenant("dev")))
    refused = client.post("/classify", json={"inputs": "hi", "adapter_id": "acme/11"})
    assert refused.status_code == 400
    assert "classification adapters are served by engine tuneforge" in refused.text
    assert engine.process.pid is None


def test_one_engine_pass_classifies_for_two_adapters_and_embeds_for_the_base(
    tiny_model_dir: Path, root: Path
) -> None:
    """The mixed batch itself: both classifiers' texts and a base-model embedding in a single pass."""
    engine = make_engine(tiny_model_dir, root)
    ids = [list(t) for t in AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS)["input_ids"]]
    boxes: list[queue.SimpleQueue[EmbeddingResult | ServingError]] = []
    for adapter_id, classify in (("acme/11", True), ("acme/12", True), (None, False)):
        box: queue.SimpleQueue[EmbeddingResult | ServingError] = queue.SimpleQueue()
        ref = engine.adapters.resolve(adapter_id, "t") if adapter_id else None
        engine.embedder.admit(EmbeddingJob(ids, ref, box.put, classify=classify))
        if ref is not None:
            assert engine.adapters.wait(ref, 60)
        boxes.append(box)
    assert engine.embedder.step() == 3 * len(TEXTS)  # all of them in one pass
    results = [box.get_nowait() for box in boxes]
    for adapter_id, result in zip(LABELS, results, strict=False):
        assert isinstance(result, EmbeddingResult) and result.labels == tuple(LABELS[adapter_id])
        torch.testing.assert_close(
            result.vectors, reference(tiny_model_dir, root / adapter_id, TEXTS), atol=1e-4, rtol=1e-4
        )
    assert isinstance(results[2], EmbeddingResult) and results[2].labels is None
    assert results[2].vectors.shape == (len(TEXTS), 64)
