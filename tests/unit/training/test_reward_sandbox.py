"""The reward sandbox scores completions with reward functions, and a failing call costs only itself.

Real bubblewrap processes throughout (the worker image and CI install bubblewrap); the hostile cases
(escapes, fork bombs, memory hogs) are in tests/hostile/test_reward_functions.py.
"""

from __future__ import annotations

import ctypes.util
import datetime
import struct
import sys
import time
from collections.abc import Iterator

import pyseccomp
import pytest

from worker.training import reward_sandbox, reward_seccomp
from worker.training.reward_sandbox import RewardSandbox, SandboxLimits

FAST = SandboxLimits(call_timeout_seconds=1.0)

LENGTH = "def length(prompt, completion, example):\n    return len(completion) / 10\n"
# Reads all three arguments: the example is the dataset row, passed through as JSON.
MATCHES = (
    "def matches(prompt, completion, example):\n"
    "    return 1.0 if completion.strip() == example['answer'] and prompt.startswith('Q') else 0.0\n"
)
RAISES = "def raises(prompt, completion, example):\n    raise ValueError('no answer in ' + completion)\n"
# Hangs on completion 'x' only: the calls after it must still be scored.
HANGS = "def hangs(prompt, completion, example):\n    while completion == 'x':\n        pass\n    return 1\n"
SLEEPS = "def sleeps(prompt, completion, example):\n    import time\n    time.sleep(60)\n"
# Non-numbers by completion; the last one is a real number.
RETURNS = (
    "def returns(prompt, completion, example):\n"
    "    return {'str': 'abc', 'none': None, 'nan': float('nan'), 'inf': float('-inf'),\n"
    "            'list': [1.0], 'big': 10**400}.get(completion, 3)\n"
)


def _score(sandbox: RewardSandbox, completions: list[str]) -> reward_sandbox.Scores:
    n = len(completions)
    return sandbox.score(["Q?"] * n, completions, [{"answer": "4"}] * n)


@pytest.fixture
def sandbox() -> Iterator[RewardSandbox]:
    functions = {"length": LENGTH, "matches": MATCHES, "raises": RAISES, "hangs": HANGS, "returns": RETURNS}
    with RewardSandbox(functions, FAST) as box:
        yield box


def test_a_normal_function_scores_each_completion(sandbox: RewardSandbox) -> None:
    scores = _score(sandbox, ["4", "hello", " 4 "])
    assert scores.values["length"] == [0.1, 0.5, 0.3]
    assert scores.values["matches"] == [1.0, 0.0, 1.0]
    assert scores.failures["length"] == scores.failures["matches"] == 0
    assert "length" not in scores.errors and "matches" not in scores.errors


def test_a_function_that_raises_scores_zero_and_counts_each_failure(sandbox: RewardSandbox) -> None:
    scores = _score(sandbox, ["4", "5"])
    assert scores.values["raises"] == [0.0, 0.0]
    assert scores.failures["raises"] == 2
    assert scores.errors["raises"] == "raised ValueError: no answer in 4"
    # The other functions in the same batch are untouched.
    assert scores.values["length"] == [0.1, 0.1]


def test_a_hanging_call_times_out_and_the_calls_after_it_are_still_scored(sandbox: RewardSandbox) -> None:
    started = time.monotonic()
    scores = _score(sandbox, ["a", "x", "b", "c"])
    assert scores.values["hangs"] == [1.0, 0.0, 1.0, 1.0]
    assert scores.failures["hangs"] == 1
    assert scores.errors["hangs"] == "timed out after 1s"
    assert time.monotonic() - started < 5


def test_a_function_that_sleeps_is_stopped_by_the_wall_clock_not_cpu() -> None:
    with RewardSandbox({"sleeps": SLEEPS}, FAST) as box:
        started = time.monotonic()
        scores = _score(box, ["a"])
        assert time.monotonic() - started < 3
    assert scores.values["sleeps"] == [0.0]
    assert scores.errors["sleeps"] == "timed out after 1s"


def test_non_numbers_and_non_finite_numbers_score_zero_as_failures(sandbox: RewardSandbox) -> None:
    scores = _score(sandbox, ["str", "none", "nan", "inf", "list", "big", "ok"])
    assert scores.values["returns"] == [0.0] * 6 + [3.0]
    assert scores.failures["returns"] == 6
    assert scores.errors["returns"] == "returned str, not a number"


def test_the_sandbox_is_reused_across_batches(sandbox: RewardSandbox) -> None:
    assert _score(sandbox, ["4"]).values["length"] == [0.1]
    assert _score(sandbox, ["four"]).values["length"] == [0.4]


def test_a_function_near_its_cpu_limit_gets_a_fresh_process_instead_of_a_killed_call() -> None:
    # 0.15 s of CPU per call against a 1 s RLIMIT_CPU: without recycling the seventh call would die.
    burns = (
        "def burns(prompt, completion, example):\n"
        "    import time\n"
        "    end = time.process_time() + 0.15\n"
        "    while time.process_time() < end:\n"
        "        pass\n"
        "    return 1.0\n"
    )
    limits = SandboxLimits(call_timeout_seconds=5, cpu_seconds=1)
    with RewardSandbox({"burns": burns}, limits) as box:
        scores = _score(box, ["a"] * 9)
    assert scores.values["burns"] == [1.0] * 9, scores.errors


def test_a_function_that_fails_to_load_fails_every_call_with_the_reason() -> None:
    broken = "def broken(prompt, completion, example, bad=1 / 0):\n    return 1.0\n"
    with RewardSandbox({"broken": broken, "length": LENGTH}, FAST) as box:
        scores = _score(box, ["a", "bb"])
    assert scores.values == {"broken": [0.0, 0.0], "length": [0.1, 0.2]}
    assert scores.failures["broken"] == 2
    assert scores.errors["broken"] == "failed to load: ZeroDivisionError: division by zero"


def test_the_function_may_have_another_name_than_its_key() -> None:
    with RewardSandbox({"my_reward": "def f(prompt, completion, example):\n    return 2.5\n"}) as box:
        assert _score(box, ["a"]).values == {"my_reward": [2.5]}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(:\n", "reward function 'f': the source is not valid Python"),
        ("x = 1\n", "reward function 'f': the source must define exactly one function"),
    ],
)
def test_sources_that_define_no_function_are_refused_at_construction(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardSandbox({"f": source})


def test_parallel_lists_must_have_one_entry_per_completion(sandbox: RewardSandbox) -> None:
    with pytest.raises(ValueError, match="parallel lists, got 1, 2 and 2 entries"):
        sandbox.score(["p"], ["a", "b"], [{}, {}])


def test_examples_travel_as_json_with_other_values_as_text() -> None:
    reads = "def reads(prompt, completion, example):\n    return len(example['when'])\n"
    with RewardSandbox({"reads": reads}, FAST) as box:
        scores = box.score(["p"], ["c"], [{"when": datetime.date(2026, 1, 2)}])
        assert scores.values["reads"] == [10.0]
        with pytest.raises(ValueError, match=r"examples\[1\] cannot be passed to a reward function as JSON"):
            box.score(["p", "p"], ["c", "c"], [{}, {(1, 2): "tuple key"}])  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "limits",
    [{"call_timeout_seconds": 0}, {"cpu_seconds": 0}, {"memory_bytes": 2**20}, {"max_processes": 1}],
)
def test_limits_that_leave_no_room_to_run_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="SandboxLimits: "):
        SandboxLimits(**limits)  # type: ignore[arg-type]


def test_without_bubblewrap_it_refuses_rather_than_run_unsandboxed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reward_sandbox.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match=r"reward functions need bubblewrap \(bwrap\) on the worker"):
        RewardSandbox({"length": LENGTH})


def test_without_libseccomp_it_refuses_rather_than_run_unfiltered(monkeypatch: pytest.MonkeyPatch) -> None:
    # The binding loads libseccomp.so.2 when imported: a fresh import on a machine without it.
    find_library = ctypes.util.find_library
    monkeypatch.setattr(
        ctypes.util, "find_library", lambda name: None if name == "seccomp" else find_library(name)
    )
    monkeypatch.delitem(sys.modules, "pyseccomp")
    with pytest.raises(RuntimeError, match=r"reward functions need libseccomp \(the libseccomp2 package\)"):
        RewardSandbox({"length": LENGTH})


def test_the_seccomp_filter_is_built_once_per_sandbox_not_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[bytes] = []

    def counted() -> bytes:
        built.append(reward_seccomp.seccomp_program())
        return built[-1]

    monkeypatch.setattr(reward_sandbox, "seccomp_program", counted)
    # The probe, two functions and a fresh process after the first hang: four processes, one filter.
    with RewardSandbox({"length": LENGTH, "hangs": HANGS}, FAST) as box:
        assert _score(box, ["a", "x", "bb"]).values == {"length": [0.1, 0.1, 0.2], "hangs": [1.0, 0.0, 1.0]}
        assert _score(box, ["x"]).values["hangs"] == [0.0]
    assert len(built) == 1


def test_the_seccomp_filter_checks_the_native_architecture_first() -> None:
    # struct sock_filter {u16 code; u8 jt, jf; u32 k}: load the arch field of seccomp_data (offset 4),
    # then compare it with the architecture this interpreter, and so the sandbox's, runs in.
    program = reward_seccomp.seccomp_program()
    (load, _, _, offset), (compare, _, _, arch) = struct.iter_unpack("=HBBI", program[:16])
    assert (load, offset) == (0x20, 4)  # BPF_LD | BPF_W | BPF_ABS
    assert compare == 0x15 and arch == pyseccomp.system_arch()  # BPF_JMP | BPF_JEQ | BPF_K


def test_ordinary_python_runs_unchanged_behind_the_seccomp_filter() -> None:
    # Threads, a child process and the standard library's usual modules all pass the filter.
    busy = (
        "def busy(prompt, completion, example):\n"
        "    import json, re, subprocess, threading, tempfile\n"
        "    found = []\n"
        "    worker = threading.Thread(target=lambda: found.extend(re.findall('[0-9]', completion)))\n"
        "    worker.start()\n"
        "    worker.join()\n"
        "    with tempfile.TemporaryFile() as scratch:\n"
        "        scratch.write(json.dumps(found).encode())\n"
        "    subprocess.run(['true'], check=True)\n"
        "    return len(found)\n"
    )
    with RewardSandbox({"busy": busy}, FAST) as box:
        scores = _score(box, ["a1b2c3", "none"])
    assert scores.values["busy"] == [3.0, 0.0], scores.errors


def test_a_package_not_installed_on_the_worker_is_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"runtime\.packages: 'no-such-package-tf' is not installed on the workers"
    ):
        RewardSandbox({"length": LENGTH}, packages=["no-such-package-tf"])


def test_installed_packages_are_importable_only_when_asked_for() -> None:
    uses_numpy = (
        "def uses_numpy(prompt, completion, example):\n"
        "    import numpy\n"
        "    return numpy.float64(len(completion))\n"
    )
    with RewardSandbox({"uses_numpy": uses_numpy}, FAST, packages=["numpy"]) as box:
        assert _score(box, ["abc"]).values["uses_numpy"] == [3.0]
    with RewardSandbox({"uses_numpy": uses_numpy}, FAST) as box:
        scores = _score(box, ["abc"])
    assert scores.values["uses_numpy"] == [0.0]
    assert scores.errors["uses_numpy"].startswith("raised ModuleNotFoundError: No module named 'numpy'")


def test_close_ends_every_sandbox_process() -> None:
    psutil = pytest.importorskip("psutil")
    # A test suite's servers and workers are children of this process too: only the new ones count.
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    sandbox = RewardSandbox({"length": LENGTH, "matches": MATCHES}, FAST)
    _score(sandbox, ["a"])
    started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert started
    sandbox.close()
    assert [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in before] == []
