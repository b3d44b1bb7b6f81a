"""The bad-input table: what a careless or hostile user may pass, and what they must get back.

Each row is an input, the error class (or exit code) it must give, and words its message must
hold: a clear sentence saying what is wrong and what to do, never a traceback, never a silent
success. By area: the API (generator, streams, pools), sf-generate in-process, the loaders, the
export and training commands, signals (subprocesses), and sf-serve over a real loopback
websocket and HTTP. One tiny model is shared by every row (conftest's ``tiny_model_dir``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import CheckpointError
from sf_sdk.pool import PoolFullError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
P = "a red circle moving left"
BLUE = "a blue square moving right"


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path) -> StreamingGenerator:
    return StreamingGenerator.from_pretrained(tiny_model_dir, backend="eager")


def _raises(fn: Callable[[], Any], error: type[BaseException], words: tuple[str, ...]) -> None:
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "weights_only=False" not in message and "Traceback" not in message


# --------------------------------------------------------------------------------------------
# The API: generate / stream arguments, steering, pools, backends
# --------------------------------------------------------------------------------------------


def _finished_stream(gen: StreamingGenerator):
    stream = gen.stream(P, num_frames=9)
    list(stream)
    return stream


def _pool_of_one(gen: StreamingGenerator):
    pool = gen.pool(1)
    pool.open(P, num_frames=9)
    return pool


D = 32  # the tiny DiT's text_dim
API = [
    ("frames 0", lambda g: g.generate(P, num_frames=0), ValueError, ("num_frames must be a positive int", "got 0")),
    ("frames negative", lambda g: g.generate(P, num_frames=-3), ValueError, ("positive int", "-3")),
    ("frames float", lambda g: g.generate(P, num_frames=9.0), ValueError, ("positive int", "9.0")),
    ("frames str", lambda g: g.generate(P, num_frames="9"), ValueError, ("positive int", "'9'")),
    ("frames bool", lambda g: g.generate(P, num_frames=True), ValueError, ("positive int", "True")),
    ("frames not whole chunks", lambda g: g.generate(P, num_frames=10), ValueError,
     ("not a whole number of chunks", "nearest valid: [9, 21]")),
    ("frames None to generate", lambda g: g.generate(P, num_frames=None), ValueError,
     ("needs num_frames", "use stream()")),
    ("no prompt", lambda g: g.generate(num_frames=9), ValueError, ("exactly one of prompt", "prompt_embeds")),
    ("empty prompt", lambda g: g.generate("", num_frames=9), ValueError, ("prompt is empty", "describe the video")),
    ("blank prompt", lambda g: g.generate(" \t\n ", num_frames=9), ValueError, ("prompt is empty",)),
    ("prompt int", lambda g: g.generate(5, num_frames=9), ValueError, ("prompt must be a string", "int")),
    ("prompt list", lambda g: g.generate([P], num_frames=9), ValueError, ("prompt must be a string", "list")),
    ("prompt and embeds", lambda g: g.generate(P, prompt_embeds=torch.zeros(3, D), num_frames=9), ValueError,
     ("exactly one of prompt",)),
    ("embeds wrong width", lambda g: g.generate(prompt_embeds=torch.zeros(3, 7), num_frames=9), ValueError,
     ("prompt_embeds must be [L, text_dim=32]", "(3, 7)")),
    ("embeds rank 1", lambda g: g.generate(prompt_embeds=torch.zeros(7), num_frames=9), ValueError,
     ("prompt_embeds must be", "(7,)")),
    ("embeds NaN", lambda g: g.generate(prompt_embeds=torch.full((3, D), float("nan")), num_frames=9), ValueError,
     ("NaN or infinite",)),
    ("embeds too many rows", lambda g: g.generate(prompt_embeds=torch.zeros(1000, D), num_frames=9), ValueError,
     ("1..16 rows", "1000")),
    ("seed float", lambda g: g.generate(P, num_frames=9, seed=1.5), ValueError, ("seed must be an int", "1.5")),
    ("seed str", lambda g: g.generate(P, num_frames=9, seed="1"), ValueError, ("seed must be an int",)),
    ("seed too large", lambda g: g.generate(P, num_frames=9, seed=2**64), ValueError,
     ("seed must lie in", str(2**64))),
    ("decode not a bool", lambda g: g.generate(P, num_frames=9, decode="no"), ValueError,
     ("decode must be True or False", "'no'")),
    ("unknown keyword", lambda g: g.generate(P, num_frames=9, steps=4), TypeError, ("unexpected keyword", "steps")),
    ("initial frames float", lambda g: g.generate(P, num_frames=9, initial_frames=np.zeros((5, 16, 16, 3),
                                                                                            np.float32)),
     ValueError, ("initial_frames must be uint8",)),
    ("initial frames wrong size", lambda g: g.generate(P, num_frames=9, initial_frames=np.zeros((5, 32, 32, 3),
                                                                                                np.uint8)),
     ValueError, ("[T, 16, 16, 3]", "(5, 32, 32, 3)")),
    ("initial latent wrong shape", lambda g: g.generate(P, num_frames=9, initial_latent=torch.zeros(3, 5, 2, 2)),
     ValueError, ("initial_latent must be [F, 16, 2, 2]",)),
    ("image on a chunk-wise model", lambda g: g.generate(P, num_frames=9, image=np.zeros((16, 16, 3), np.uint8)),
     ValueError, ("frame-wise model", "num_frame_per_block=1")),
    ("set_prompt unknown transition", lambda g: g.stream(P, num_frames=9).set_prompt(BLUE, transition="fade"),
     ValueError, ("transition must be one of", "'fade'")),
    ("set_prompt blend of 0 chunks", lambda g: g.stream(P, num_frames=9).set_prompt(BLUE, transition="blend",
                                                                                    chunks=0),
     ValueError, ("chunks >= 1", "got 0")),
    ("set_prompt empty", lambda g: g.stream(P, num_frames=9).set_prompt(""), ValueError, ("prompt is empty",)),
    ("set_prompt nothing", lambda g: g.stream(P, num_frames=9).set_prompt(), ValueError, ("exactly one of prompt",)),
    ("set_prompt on a finished stream", lambda g: _finished_stream(g).set_prompt(BLUE), RuntimeError,
     ("closed stream", "gen.stream(")),
    ("pool of 0", lambda g: g.pool(0), ValueError, ("max_streams must be a positive int", "0")),
    ("pool of 1.5", lambda g: g.pool(1.5), ValueError, ("max_streams must be a positive int", "1.5")),
    ("pool full", lambda g: _pool_of_one(g).open(P, num_frames=9), PoolFullError,
     ("all 1 slots", "close a stream")),
    ("pool open empty prompt", lambda g: g.pool(1).open("", num_frames=9), ValueError, ("prompt is empty",)),
    ("pool stream bad transition", lambda g: g.pool(1).open(P, num_frames=9).set_prompt(BLUE, transition="x"),
     ValueError, ("transition must be one of",)),
    ("unknown backend", lambda g: g.use_backend("nope"), ValueError, ("backend 'nope' is not available",
                                                                      "choose one of")),
    ("artifact backend without a folder", lambda g: g.use_backend("onnxruntime"), ValueError,
     ("needs backend_options={'artifact_dir': DIR}", "python -m export.onnx")),
    ("artifact folder never exported", lambda g: g.use_backend("onnxruntime", {"artifact_dir": "/nonexistent"}),
     FileNotFoundError, ("holds no export.json", "export into it first")),
    ("eager backend options", lambda g: g.use_backend("eager", {"x": 1}), ValueError, ("takes no options",)),
]


@pytest.mark.parametrize("call, error, words", [row[1:] for row in API], ids=[row[0] for row in API])
def test_api(gen: StreamingGenerator, call, error, words) -> None:
    try:
        _raises(lambda: call(gen), error, words)
    finally:
        gen.use_backend("eager")  # rows may leave a stream or a backend behind


def test_unknown_words_warn_once_per_prompt(gen: StreamingGenerator, caplog) -> None:
    with caplog.at_level("WARNING", logger="sf_sdk"):
        gen.generate("a red cat surfing left", num_frames=9)
        gen.generate("a red cat surfing left", num_frames=9)
        gen.generate(P, num_frames=9)
        gen.generate("A red circle, moving left!", num_frames=9)  # case and punctuation: no warning
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert warned == ["prompt 'a red cat surfing left': the model does not know the words 'cat', 'surfing'; they "
                      "are read as an unknown token, so the video will not show them: use words the model was "
                      "trained on"]


def test_sentencepiece_vocabularies_warn_only_for_truly_unknown_text(tmp_path: Path) -> None:
    """A SentencePiece-style (Unigram + Metaspace) vocabulary, like umT5's, spells a word it has
    never seen in pieces: no warning; only a character with no piece at all becomes <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sf_sdk.models.text import PromptTokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "\u2581red", *"abcdefghijklmnopqrstuvwxyz"]
    vocab = [(p, 0.0 if p.startswith("<") else -float(len(pieces) - len(p))) for p in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>",
                                                                "unk_token": "<unk>"}))
    sp = PromptTokenizer(tmp_path, text_len=64)
    assert sp.unknown_words("a red cat surfing a wave") == []
    assert sp.unknown_words("a red \u732b") == ["\u732b"]


# --------------------------------------------------------------------------------------------
# sf-generate, in-process: exit code 2 and one line for every mistake
# --------------------------------------------------------------------------------------------

CLI = [
    ("empty prompt", ["   "], 2, ("the prompt is empty",)),
    ("frames 0", ["--frames", "0"], 2, ("--frames must be a positive number",)),
    ("frames not whole chunks", ["--frames", "20"], 2, ("not a whole number of chunks", "nearest valid")),
    ("frames not a number", ["--frames", "nine"], 2, ("invalid int value", "'nine'")),
    ("seconds infinite", ["--seconds", "inf"], 2, ("--seconds must be a positive number", "inf")),
    ("seconds NaN", ["--seconds", "nan"], 2, ("--seconds must be a positive number", "nan")),
    ("frames and seconds", ["--frames", "9", "--seconds", "1"], 2, ("not allowed with argument",)),
    ("window negative", ["--window", "-2"], 2, ("--window must be a positive number",)),
    ("sink without window", ["--sink", "1"], 2, ("--sink needs --window",)),
    ("prompt-at without colon", ["--prompt-at", "40 blue"], 2, ("--prompt-at needs FRAME:PROMPT",)),
    ("prompt-at empty prompt", ["--prompt-at", "5:"], 2, ("the prompt after the colon is empty",)),
    ("prompt-at frame 0", ["--prompt-at", "0:a blue square"], 2, ("the frame must be after the start",)),
    ("prompt-at after the end", ["--frames", "9", "--prompt-at", "40:a blue square"], 2,
     ("not before the end of the video (9 frames)",)),
    ("unknown transition", ["--transition", "fade"], 2, ("invalid choice: 'fade'",)),
    ("blend of 0 chunks", ["--blend-chunks", "0"], 2, ("--blend-chunks must be a positive number",)),
    ("threads 0", ["--threads", "0"], 2, ("--threads must be a positive number",)),
    ("unknown device", ["--device", "tpu"], 2, ("unknown device 'tpu'",)),
    ("absent GPU", ["--device", "cuda"], 2, ("CUDA is not available",)),
    ("unknown dtype", ["--dtype", "float8"], 2, ("unknown dtype 'float8'",)),
    ("unknown option", ["--nope"], 2, ("unrecognized arguments: --nope",)),
    ("unknown backend", ["--frames", "9", "--backend", "nope"], 2, ("backend 'nope' is not available",)),
    ("artifact backend without folder", ["--frames", "9", "--backend", "onnxruntime"], 2,
     ("--backend onnxruntime needs --artifact-dir DIR",)),
    ("artifact folder missing", ["--backend", "onnxruntime", "--artifact-dir", "{tmp}/none"], 2,
     ("--artifact-dir", "is not a folder")),
    ("artifact folder never exported", ["--frames", "9", "--backend", "onnxruntime", "--artifact-dir", "{tmp}"],
     2, ("holds no export.json",)),
    ("options of another backend", ["--frames", "9", "--backend", "eager", "--artifact-dir", "{tmp}"], 2,
     ("the eager backend takes no options",)),
    ("output is a folder", ["--output", "{tmp}"], 2, ("is a folder: give a file name",)),
    ("output exists", ["--output", "{tmp}/old.mp4"], 2, ("exists: pass --overwrite",)),
    ("output under a file", ["--output", "{tmp}/old.mp4/x.mp4"], 2, ("is a file, not a folder",)),
    ("output where nothing can be created", ["--frames", "9", "--output", "/proc/none/x.mp4"], 2,
     ("cannot create the folder /proc/none",)),
    ("missing model", ["--model", "{tmp}/nowhere"], 2, ("neither a model folder",)),
    ("wan-dir for a model folder", ["--wan-dir", "{tmp}"], 2, ("apply to official checkpoints only",)),
]


@pytest.mark.parametrize("args, code, words", [row[1:] for row in CLI], ids=[row[0] for row in CLI])
def test_sf_generate(tiny_model_dir: Path, tmp_path: Path, capsys, args, code, words) -> None:
    from sf_sdk.cli import main

    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    prompt = [] if args[0] == "   " else [P]
    defaults = {"--model": str(tiny_model_dir), "--output": str(tmp_path / "new.mp4")}
    extra = [x for k, v in defaults.items() if k not in args for x in (k, v)]
    try:
        got = main([*prompt, *args, *extra, "--no-progress"])
    except SystemExit as exc:  # argparse's own errors
        got = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sf-generate: error:")]
    assert got == code and len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "new.mp4").exists() and (tmp_path / "old.mp4").read_bytes() == b"an earlier video"


# --------------------------------------------------------------------------------------------
# Loaders: missing, wrong, truncated and malicious files, wrong folders
# --------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, fn: Any, arg: Any) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self):  # what a malicious checkpoint does: a call on load
        return (self.fn, (self.arg,))


def _evil(tmp: Path, fn: Any, arg: Any) -> Path:
    path = tmp / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {"w": _RunsCode(fn, arg)}}, path)
    return path


def _folder_with(tmp: Path, model: Path, change: Callable[[Path], None]) -> Path:
    folder = tmp / "model"
    shutil.copytree(model, folder)
    change(folder)
    return folder


def _official(path: Path):
    from sf_sdk.checkpoint.official import load_official

    return load_official(path, None, load_vae=False, load_text_encoder=False)


LOADERS = [
    ("nowhere", lambda t, m: StreamingGenerator.from_pretrained(t / "nowhere"), CheckpointError,
     ("neither a model folder, a checkpoint file nor a bundled model",)),
    ("empty folder", lambda t, m: StreamingGenerator.from_pretrained(t), CheckpointError,
     ("has no model_index.json", "python -m export.convert")),
    ("a text file", lambda t, m: (t / "notes.txt").write_text("hi") and
     StreamingGenerator.from_pretrained(t / "notes.txt"), CheckpointError, ("is a file but not a checkpoint",)),
    ("the tokenizer folder", lambda t, m: StreamingGenerator.from_pretrained(m.parent / "tok"), CheckpointError,
     ("has no model_index.json",)),
    ("truncated weights", lambda t, m: StreamingGenerator.from_pretrained(_folder_with(
        t, m, lambda f: os.truncate(f / "dit.safetensors", 1000))), CheckpointError,
     ("cannot read", "dit.safetensors", "truncated, corrupt")),
    ("missing weights", lambda t, m: StreamingGenerator.from_pretrained(_folder_with(
        t, m, lambda f: (f / "dit.safetensors").unlink())), CheckpointError,
     ("DiT weights", "are missing from the model folder")),
    ("corrupt index", lambda t, m: StreamingGenerator.from_pretrained(_folder_with(
        t, m, lambda f: (f / "model_index.json").write_text("{oops"))), CheckpointError,
     ("model_index.json is not valid JSON", "the folder is corrupt")),
    ("empty checkpoint", lambda t, m: (t / "self_forcing_dmd.pt").write_bytes(b"") or
     _official(t / "self_forcing_dmd.pt"), CheckpointError, ("is empty (0 bytes)",)),
    ("malicious os.system", lambda t, m: _official(_evil(t, os.system, "echo owned")), CheckpointError,
     ("tries to run code when it is loaded", "system", "must not be loaded", "source you trust")),
    ("malicious eval", lambda t, m: _official(_evil(t, eval, "1 + 1")), CheckpointError,
     ("tries to run code when it is loaded", "eval", "must not be loaded")),
    ("malicious subprocess", lambda t, m: _official(_evil(t, subprocess.getoutput, "id")), CheckpointError,
     ("tries to run code when it is loaded", "getoutput")),
    ("objects besides tensors", lambda t, m: _official(_evil(t, Fraction, "1/3")), CheckpointError,
     ("holds Python objects besides tensors", "torch.save(module.state_dict())")),
    # two levels down: the loader also searches the checkpoint's grandparent, which for tmp_path is
    # the session's folder of every test's temporary files (another test's Wan folder is there)
    ("official checkpoint without its Wan folder", lambda t, m: (t / "ckpt" / "x").mkdir(parents=True) or
     (t / "ckpt" / "x" / "self_forcing_dmd.pt").write_bytes(b"x") and
     StreamingGenerator.from_pretrained(t / "ckpt" / "x" / "self_forcing_dmd.pt"), CheckpointError,
     ("no Wan folder beside it", "wan_dir=")),
    ("missing Wan folder", lambda t, m: (t / "self_forcing_dmd.pt").write_bytes(b"x") and
     StreamingGenerator.from_pretrained(t / "self_forcing_dmd.pt", wan_dir=t / "nowhere"), CheckpointError,
     ("Wan folder", "does not exist")),
    ("unknown streaming key", lambda t, m: StreamingGenerator.from_pretrained(m, streaming={"nope": 1}), ValueError,
     ("unknown StreamingConfig keys ['nope']",)),
    ("bad streaming value", lambda t, m: StreamingGenerator.from_pretrained(m, streaming={"local_attn_size": 0}),
     ValueError, ("local_attn_size must be -1 (global) or a positive number",)),
    ("unknown device", lambda t, m: StreamingGenerator.from_pretrained(m, device="tpu"), ValueError,
     ("unknown device 'tpu'",)),
    ("unknown dtype", lambda t, m: StreamingGenerator.from_pretrained(m, dtype="float8"), ValueError,
     ("unknown dtype 'float8'",)),
]


@pytest.mark.parametrize("call, error, words", [row[1:] for row in LOADERS], ids=[row[0] for row in LOADERS])
def test_loaders(tiny_model_dir: Path, tmp_path: Path, call, error, words) -> None:
    _raises(lambda: call(tmp_path, tiny_model_dir), error, words)


def test_a_malicious_checkpoint_runs_nothing(tmp_path: Path) -> None:
    """The payload would create a file: it must not exist afterwards, from the API or sf-generate."""
    from sf_sdk.cli import main

    marker = tmp_path / "owned"
    path = _evil(tmp_path, os.system, f"touch {marker}")
    _raises(lambda: _official(path), CheckpointError, ("tries to run code",))
    assert main(["x", "--model", str(path), "--wan-dir", str(tmp_path), "--output", str(tmp_path / "x.mp4")]) == 2
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The export and training commands, in-process
# --------------------------------------------------------------------------------------------


def _export(tool: str, *args: str) -> int:
    import importlib

    try:
        return importlib.import_module(f"export.{tool}").main(list(args))
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _train(*args: str) -> int:
    from training.train import _check_command

    try:
        _check_command(list(args))
    except SystemExit as exc:
        return exc.code
    return 0


TINY = ("--model", "tiny", "--random-init", "--latent-hw", "2", "2")
COMMANDS = [
    ("onnx --out is a file", lambda t: _export("onnx", *TINY, "--out", str(t / "file")), 2,
     ("--out", "is a file, not a folder")),
    ("onnx --out cannot be created", lambda t: _export("onnx", *TINY, "--out", "/proc/none/out"), 2,
     ("cannot write there",)),
    ("onnx --device unknown", lambda t: _export("onnx", *TINY, "--out", str(t / "o"), "--device", "tpu"), 2,
     ("--device: unknown device 'tpu'",)),
    ("aoti --device absent", lambda t: _export("aoti", *TINY, "--out", str(t / "o"), "--device", "cuda"), 2,
     ("--device", "CUDA is not available")),
    ("onnx --dtype unknown", lambda t: _export("onnx", *TINY, "--out", str(t / "o"), "--dtype", "float8"), 2,
     ("unknown dtype 'float8'",)),
    ("onnx --window 0", lambda t: _export("onnx", *TINY, "--out", str(t / "o"), "--window", "0"), 2,
     ("local_attn_size must be -1 (global) or a positive number",)),
    ("onnx missing model", lambda t: _export("onnx", "--model", str(t / "none"), "--out", str(t / "o")), 2,
     ("neither a model folder",)),
    ("onnx --random-init of a folder", lambda t: _export("onnx", "--model", str(t), "--random-init", "--out",
                                                         str(t / "o")), 2, ("--random-init needs a preset name",)),
    ("onnx unknown option", lambda t: _export("onnx", *TINY, "--out", str(t / "o"), "--fast"), 2,
     ("unrecognized arguments: --fast",)),
    ("trt --dtype not float32", lambda t: _export("trt", *TINY, "--out", str(t / "o"), "--dtype", "bfloat16"), 2,
     ("--dtype must stay float32 for TensorRT",)),
    ("convert missing checkpoint", lambda t: _export("convert", "--checkpoint", str(t / "none.pt"), "--wan-dir",
                                                     str(t), "--out", str(t / "o")), 2,
     ("Wan folder", "lacks ['Wan2.1_VAE.pth'", "download the official")),
    ("tiny --out is a file", lambda t: _export("tiny", "--model", "shapes-tiny", "--out", str(t / "file")), 2,
     ("--out", "is a file, not a folder")),
    ("bench unknown backend", lambda t: _export("bench", "--backends", "eager,warp"), 2,
     ("--backends must be among", "warp")),
    ("bench --chunks 0", lambda t: _export("bench", "--chunks", "0"), 2, ("--chunks must be > 0",)),
    ("train without a config", lambda t: _train("run_dir=x"), 2, ("no config given: pass --config-name",)),
    ("train unknown config", lambda t: _train("--config-name", "nope"), 2, ("no config 'nope'", "smoke")),
    ("train unknown key", lambda t: _train("--config-name", "smoke", "nokey=1"), 2, ("Could not override 'nokey'",)),
    ("train bad type", lambda t: _train("--config-name", "smoke", "vae.steps=abc"), 2,
     ("vae.steps must be an int", "'abc'")),
    ("train bad value", lambda t: _train("--config-name", "smoke", "vae.steps=-1"), 2,
     ("steps must be positive", "-1")),
    ("train unknown stage", lambda t: _train("--config-name", "smoke", "stages=[nostage]"), 2,
     ("unknown stages ['nostage']",)),
    ("train bad override syntax", lambda t: _train("--config-name", "smoke", "vae.steps=["), 2,
     ("override_grammar",)),
]


@pytest.mark.parametrize("call, code, words", [row[1:] for row in COMMANDS], ids=[row[0] for row in COMMANDS])
def test_commands(tmp_path: Path, capsys, call, code, words) -> None:
    (tmp_path / "file").write_text("not a folder")
    got = call(tmp_path)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert got == code and len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# --------------------------------------------------------------------------------------------
# Exit codes and signals, in subprocesses
# --------------------------------------------------------------------------------------------


def _stop_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.1)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_exit_code_helper_maps_errors_and_real_signals(capsys) -> None:
    from sf_sdk.exit_codes import Stopped, UserError, run_command, stop_signals

    def raising(exc: BaseException) -> Callable[[Any], int]:
        def body(signals) -> int:
            raise exc
        return body

    def killed(signals) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered between bytecodes, as from another process
        time.sleep(5)
        return 0

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert run_command("cmd", lambda signals: 0) == 0
    assert run_command("cmd", raising(UserError("bad --x"))) == 2
    assert run_command("cmd", raising(FileNotFoundError("no such model"))) == 2
    assert run_command("cmd", raising(RuntimeError("boom"))) == 1
    assert run_command("cmd", raising(OSError(28, "No space left on device"))) == 1
    assert run_command("cmd", raising(KeyboardInterrupt())) == 130
    assert run_command("cmd", killed) == 143
    assert capsys.readouterr().err.splitlines() == [
        "cmd: error: bad --x", "cmd: error: no such model",
        "cmd: failed: RuntimeError: boom (rerun with --debug for the traceback)",
        "cmd: failed: OSError: [Errno 28] No space left on device (rerun with --debug for the traceback)",
        "cmd: interrupted", "cmd: terminated"]
    # Held: a signal inside the block is raised when the block ends, not in the middle of it.
    done = []
    with pytest.raises(Stopped) as stop, stop_signals() as signals:
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("the block finished")
    assert done == ["the block finished"] and stop.value.exit_code == 130
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored


def test_ctrl_c_exits_130_with_the_frames_it_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    part = tmp_path / ".v.mp4.part"
    proc = subprocess.Popen([sys.executable, "-m", "sf_sdk", P, "--frames", "3993", "--model", str(tiny_model_dir),
                             "--output", str(out), "--no-progress", "--threads", "1"], cwd=REPO, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: part.exists() and part.stat().st_size > 2000, signal.SIGINT)
    assert proc.returncode == 130 and err.rstrip().endswith("sf-generate: interrupted") and "Traceback" not in err
    from sf_sdk.video import read_video

    assert f"holds the {read_video(out).shape[0]} frames written so far" in err


def test_training_stops_with_143_on_sigterm_and_2_on_a_bad_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    bad = subprocess.run([sys.executable, "-m", "training.train", "--config-name", "smoke", f"run_dir={run_dir}",
                          "vae.steps=0"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("python -m training.train: error: ")
    proc = subprocess.Popen([sys.executable, "-m", "training.train", "--config-name", "smoke", f"run_dir={run_dir}",
                             "stages=[vae]", "vae.steps=100000", "num_threads=1"], cwd=tmp_path, env=ENV,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    err = _stop_when(proc, lambda: (run_dir / "vae").is_dir(), signal.SIGTERM)
    assert proc.returncode == 143, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# sf-serve: bad messages over a real loopback websocket, bad HTTP
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from serve_util import ServerProcess

    srv = ServerProcess("--max-sessions", "2", "--warmup", "0", "--backend", "eager")
    yield srv
    srv.stop()


WS = [
    ("not JSON", "{not json", "bad_json", ("not JSON",)),
    ("a JSON list", '["start"]', "bad_message", ("a JSON object with a 'type'",)),
    ("no type", '{"prompt": "x"}', "bad_message", ("'type'",)),
    ("unknown type", '{"type": "dance"}', "unknown_type", ("unknown message type 'dance'",)),
    ("prompt too long", json.dumps({"type": "start", "prompt": "x" * 501}), "prompt_too_long", ("at most",)),
    ("blank prompt", json.dumps({"type": "start", "prompt": "   "}), "bad_prompt", ("non-empty string",)),
    ("prompt a number", json.dumps({"type": "start", "prompt": 7}), "bad_prompt", ("non-empty string",)),
    ("negative seed", json.dumps({"type": "start", "prompt": P, "seed": -1}), "bad_seed", ("'seed' must be",)),
    ("seed a string", json.dumps({"type": "start", "prompt": P, "seed": "7"}), "bad_seed", ("'seed' must be",)),
    ("steer before start", json.dumps({"type": "set_prompt", "prompt": BLUE}), "not_started", ("start",)),
    ("reset before start", json.dumps({"type": "reset"}), "not_started", ("start",)),
    ("message too large", "x" * 20000, "message_too_large", ("bytes",)),
    ("ack not a number", json.dumps({"type": "ack", "frame": "last"}), "bad_frame", ("'frame' must be",)),
]


@pytest.mark.parametrize("text, code, words", [row[1:] for row in WS], ids=[row[0] for row in WS])
def test_serve_websocket(server, text: str, code: str, words) -> None:
    from serve_util import connect, recv_json

    async def go() -> dict:
        async with await connect(server.ws_url) as ws:
            await recv_json(ws, "hello")
            await ws.send(text)
            reply = await recv_json(ws, "error")
            await ws.send(json.dumps({"type": "ping"}))  # the session outlives the bad message
            assert (await recv_json(ws, "pong"))["type"] == "pong"
            return reply

    reply = asyncio.run(go())
    assert reply["type"] == "error" and reply["code"] == code, reply
    for word in words:
        assert word in reply["message"], reply


def test_serve_bad_steering_after_start(server) -> None:
    from serve_util import connect, recv_json, send

    async def go() -> list[dict]:
        async with await connect(server.ws_url) as ws:
            await recv_json(ws, "hello")
            await send(ws, type="start", prompt=P)
            await recv_json(ws, "started")
            replies = []
            for msg in ({"type": "start", "prompt": P}, {"type": "set_prompt", "prompt": BLUE, "transition": "fade"},
                        {"type": "set_prompt", "prompt": BLUE, "transition": "blend", "chunks": 0},
                        {"type": "set_prompt", "prompt": ""}):
                await send(ws, **msg)
                replies.append(await recv_json(ws, "error"))
            await send(ws, type="stop")
            await recv_json(ws, "stopped")
            return replies

    codes = [r["code"] for r in asyncio.run(go())]
    assert codes == ["already_started", "bad_transition", "bad_chunks", "bad_prompt"]


HTTP = [
    ("unknown page", "GET", "nope", 404),
    ("a path out of the package", "GET", "static/../../pyproject.toml", 404),
    ("POST to health", "POST", "healthz", 405),
    ("DELETE the metrics", "DELETE", "metrics", 405),
]


@pytest.mark.parametrize("method, path, status", [row[1:] for row in HTTP], ids=[row[0] for row in HTTP])
def test_serve_http(server, method: str, path: str, status: int) -> None:
    request = urllib.request.Request(server.url + path, method=method, data=b"" if method == "POST" else None)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == status
