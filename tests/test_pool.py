"""Stream pools and prompt transitions: a pooled stream equals the same stream alone, whoever
shares the batch; transitions change what is drawn; the cache rules hold across re-caching."""

from __future__ import annotations

import os

import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.config import StreamingConfig
from sf_sdk.pool import PoolFullError
from sf_sdk.sampling import kept_frames

C = 3  # latent frames per chunk


def _embeds(gen: StreamingGenerator, i: int) -> torch.Tensor:
    return torch.randn(5, gen.dit.config.text_dim, generator=torch.Generator().manual_seed(100 + i))


@pytest.fixture(scope="module", params=[0, 3], ids=["window", "window+sinks"])
def gen(request) -> StreamingGenerator:
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6, sink_size=request.param)
    return StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0)


# What each stream does, chunk by chunk: {chunk index: (embeds index, transition, blend chunks)}.
SCRIPT = {
    "a": {"seed": 0, "emb": 0, "join": 0, "chunks": 9, "switch": {3: (3, "recache", 1)}},
    "b": {"seed": 1, "emb": 1, "join": 1, "chunks": 7, "switch": {2: (0, "blend", 2)}},
    "c": {"seed": 2, "emb": 2, "join": 2, "chunks": 3, "switch": {1: (1, "cut", 1)}},  # leaves by itself
    "d": {"seed": 3, "emb": 3, "join": 5, "chunks": 4, "switch": {1: (1, "recache", 1)}},  # takes c's slot
}


def _frames(chunks: int) -> int:
    return 1 + 4 * (chunks * C - 1)


def _solo(gen: StreamingGenerator, spec: dict) -> list[torch.Tensor]:
    out = []
    with gen.stream(prompt_embeds=_embeds(gen, spec["emb"]), seed=spec["seed"],
                    num_frames=_frames(spec["chunks"])) as s:
        for i, chunk in enumerate(s):
            out.append((chunk.latents, chunk.frames))
            if i + 1 in spec["switch"]:
                emb, kind, n = spec["switch"][i + 1]
                s.set_prompt(prompt_embeds=_embeds(gen, emb), transition=kind, chunks=n)
    return out


def test_pooled_streams_equal_solo_streams(gen: StreamingGenerator) -> None:
    """Streams join, switch prompt (every transition) and leave at different chunks, past the window's
    first eviction: each one's chunks equal the same stream alone."""
    pool = gen.pool(3)
    handles, got = {}, {name: [] for name in SCRIPT}
    for step in range(10):
        for name, spec in SCRIPT.items():
            if spec["join"] == step:
                handles[name] = pool.open(prompt_embeds=_embeds(gen, spec["emb"]), seed=spec["seed"],
                                          num_frames=_frames(spec["chunks"]))
        out = pool.step()
        for name, h in handles.items():
            if h in out:
                got[name].append((out[h].latents, out[h].frames))
                done = len(got[name])
                if done in SCRIPT[name]["switch"] and not h.closed:
                    emb, kind, n = SCRIPT[name]["switch"][done]
                    h.set_prompt(prompt_embeds=_embeds(gen, emb), transition=kind, chunks=n)
    assert handles["d"].row == handles["c"].row  # d took the slot c left
    assert not pool.streams
    for name, spec in SCRIPT.items():
        ref = _solo(gen, spec)
        assert len(got[name]) == len(ref) == spec["chunks"]
        for (lat, frames), (ref_lat, ref_frames) in zip(got[name], ref):
            assert (lat - ref_lat).abs().max().item() <= 1e-4, name
            assert frames.shape == ref_frames.shape
            assert abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1, name


def test_transitions_change_the_stream(gen: StreamingGenerator) -> None:
    """Each transition changes the chunks after it (and only after it), differently."""
    emb0, emb1 = _embeds(gen, 0), _embeds(gen, 1)
    runs = {}
    for kind in ("none", "recache", "blend", "cut"):
        with gen.stream(prompt_embeds=emb0, seed=5, num_frames=_frames(5)) as s:
            lat = []
            for i, chunk in enumerate(s):
                lat.append(chunk.latents)
                if i == 2 and kind != "none":
                    s.set_prompt(prompt_embeds=emb1, transition=kind, chunks=2)
        runs[kind] = lat
    for kind in ("recache", "blend", "cut"):
        assert all(torch.equal(a, b) for a, b in zip(runs[kind][:3], runs["none"][:3]))
        assert not torch.allclose(runs[kind][3], runs["none"][3], atol=1e-3)
    assert not torch.allclose(runs["recache"][3], runs["cut"][3], atol=1e-4)  # the cache was re-encoded
    assert not torch.allclose(runs["blend"][3], runs["cut"][3], atol=1e-4)  # half-way, not all the way


def test_recache_with_the_same_prompt_reproduces_the_cache() -> None:
    """Before any eviction, re-encoding the cached frames under the prompt that wrote them gives the
    same keys/values (the streaming cache equals the block-causal forward)."""
    stream = StreamingConfig(latent_height=2, latent_width=2)  # global attention: nothing evicted
    gen = StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0)
    pool = gen.pool(2, max_frames=_frames(4))
    emb = _embeds(gen, 0)
    other = pool.open(prompt_embeds=_embeds(gen, 1), seed=1, num_frames=_frames(4), decode=False)
    h = pool.open(prompt_embeds=emb, seed=0, num_frames=_frames(4), decode=False)
    for _ in range(3):
        pool.step()
    valid = pool.cache.valid_tokens(h.row)
    before_k, before_v = pool.cache.k[:, h.row, :valid].clone(), pool.cache.v[:, h.row, :valid].clone()
    other_k = pool.cache.k[:, other.row].clone()
    pool._recache(h)
    assert (pool.cache.k[:, h.row, :valid] - before_k).abs().max() < 1e-5
    assert (pool.cache.v[:, h.row, :valid] - before_v).abs().max() < 1e-5
    assert torch.equal(pool.cache.k[:, other.row], other_k)  # other rows untouched
    h.set_prompt(prompt_embeds=_embeds(gen, 2), transition="recache")
    h._apply_boundary()
    assert (pool.cache.k[:, h.row, :valid] - before_k).abs().max() > 1e-3


def test_kept_frames_of_a_wrapped_ring_with_sinks() -> None:
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6, sink_size=3)
    gen = StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0)
    pool = gen.pool(1)
    h = pool.open(prompt_embeds=_embeds(gen, 0), seed=0, decode=False)
    for _ in range(4):
        pool.step()
    assert kept_frames(pool.cache, h.row) == [0, 1, 2, 9, 10, 11]
    h.set_prompt(prompt_embeds=_embeds(gen, 1))  # recache across the wrapped ring: runs, stays finite
    chunk = pool.step()[h]
    assert torch.isfinite(chunk.latents).all() and chunk.start_frame == 12


def test_reset_starts_again_at_frame_zero(gen: StreamingGenerator) -> None:
    pool = gen.pool(1)
    h = pool.open(prompt_embeds=_embeds(gen, 0), seed=0)
    first = [pool.step()[h] for _ in range(3)]
    h.reset()
    again = pool.step()[h]
    assert again.start_frame == 0 and again.frames.shape[0] == first[0].frames.shape[0] == 1 + 4 * (C - 1)
    assert again.index == 3 and h.chunks_done == 4 and pool.cache.end_frames[h.row] == C


def test_pool_errors_are_clear(gen: StreamingGenerator) -> None:
    pool = gen.pool(2)
    a = pool.open(prompt_embeds=_embeds(gen, 0))
    pool.open(prompt_embeds=_embeds(gen, 1))
    with pytest.raises(PoolFullError, match="all 2 slots"):
        pool.open(prompt_embeds=_embeds(gen, 2))
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        a.set_prompt(prompt_embeds=torch.randn(4, 7))
    with pytest.raises(ValueError, match="transition must be one of"):
        a.set_prompt(prompt_embeds=_embeds(gen, 2), transition="fade")
    with pytest.raises(ValueError, match="chunks >= 1"):
        a.set_prompt(prompt_embeds=_embeds(gen, 2), transition="blend", chunks=0)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        a.set_prompt()
    a.close()
    with pytest.raises(RuntimeError, match="closed stream"):
        a.set_prompt(prompt_embeds=_embeds(gen, 2))
    with pytest.raises(RuntimeError, match="closed stream"):
        a.reset()
    pool.open(prompt_embeds=_embeds(gen, 2))  # the slot is free again
    with pytest.raises(ValueError, match="max_streams"):
        gen.pool(0)
    glob = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=2, latent_width=2), seed=0)
    with pytest.raises(ValueError, match="holds 33 video frames"):
        glob.pool(1, max_frames=33).open(prompt_embeds=_embeds(glob, 0), num_frames=45, decode=False)
    with gen.stream(prompt_embeds=_embeds(gen, 0), num_frames=_frames(2)) as s:
        list(s)
    with pytest.raises(RuntimeError, match="closed stream"):
        s.set_prompt(prompt_embeds=_embeds(gen, 1))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_pool_memory_stays_flat_over_200_chunks(gen: StreamingGenerator) -> None:
    """Streams keep joining and leaving a pool for 200 steps: resident memory does not grow."""
    pool = gen.pool(3)
    rss, seed = [], 0
    for step in range(200):
        while pool.free_slots:
            seed += 1
            pool.open(prompt_embeds=_embeds(gen, seed % 4), seed=seed, num_frames=_frames(1 + seed % 4))
        if step % 7 == 3:
            pool.streams[0].set_prompt(prompt_embeds=_embeds(gen, step % 4), transition=("recache", "blend", "cut")[step % 3])
        pool.step()
        rss.append(_rss_mb())
    early, late = sorted(rss[40:60])[10], sorted(rss[180:200])[10]
    assert late - early < 8, (early, late)


@pytest.fixture(scope="module")
def shapes_tiny() -> StreamingGenerator:
    return StreamingGenerator.from_pretrained("shapes-tiny", streaming={"local_attn_size": 6})


@pytest.mark.parametrize("transition", ["recache", "blend", "cut"])
def test_switching_red_to_green_turns_the_object_green(shapes_tiny: StreamingGenerator, transition: str) -> None:
    """With the bundled model, a red circle switched to a green one is green within two chunks
    (the shapes evaluator's colour check), whichever transition."""
    from training.eval.shapes_bench import score_video

    red, green = "a red circle moving right", "a green circle moving right"
    with shapes_tiny.stream(red, seed=0, num_frames=_frames(5)) as s:
        chunks = []
        for i, chunk in enumerate(s):
            chunks.append(chunk.frames)
            if i == 1:
                s.set_prompt(green, transition=transition, chunks=2)
    assert score_video(chunks[1], red).checks["colour"] >= 0.8
    assert score_video(chunks[1], green).checks["colour"] <= 0.2
    after = chunks[3]  # the second chunk after the switch
    assert score_video(after, green).checks["colour"] >= 0.8, transition


def test_cli_prompt_at_switches_the_prompt(tmp_path, capsys) -> None:
    """One command, two prompts: sf-generate --prompt-at writes a video that turns green."""
    from sf_sdk.cli import main
    from sf_sdk.video import read_video
    from training.eval.shapes_bench import score_video

    out = tmp_path / "switch.mp4"
    code = main(["a red circle moving right", "--frames", "57", "--window", "6", "--prompt-at",
                 "20:a green circle moving right", "--output", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    frames = read_video(out)
    assert frames.shape[0] == 57
    assert score_video(frames[:9], "a red circle moving right").checks["colour"] >= 0.8
    assert score_video(frames[-12:], "a green circle moving right").checks["colour"] >= 0.8
    for bad, message in ((["--prompt-at", "twenty:a blue square"], "FRAME:PROMPT"),
                         (["--prompt-at", "12:"], "prompt after the colon is empty"),
                         (["--prompt-at", "0:a blue square moving up"], "after the start"),
                         (["--prompt-at", "90:a blue square moving up"], "not before the end")):
        capsys.readouterr()
        assert main(["a red circle moving right", "--frames", "57", "--output", str(tmp_path / "x.mp4"),
                     "--no-progress", *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("per_pass", [1, 2, 3])
def test_batched_decode_equals_each_stream_alone(per_pass: int) -> None:
    """decode_streams over streams at different points (one just starting) = each decoder alone
    (one latent frame per pass, the official decode), with any latents per pass."""
    from sf_sdk.models.vae import WanVAE, decode_streams

    vae = WanVAE(gen_vae_config()).eval()
    z = torch.randn(3, 16, 9, 2, 2, generator=torch.Generator().manual_seed(0))
    history = [3, 0, 6]  # latent frames each stream has decoded before
    alone = [vae.streaming_decoder() for _ in range(3)]
    batched = [vae.streaming_decoder(latents_per_pass=per_pass) for _ in range(3)]
    with torch.inference_mode():
        for decs in (alone, batched):
            for d, n, row in zip(decs, history, z):
                if n:
                    d.decode(row[None, :, :n])
        ref = [d.decode(row[None, :, n:n + 3]) for d, n, row in zip(alone, history, z)]
        chunk = torch.stack([row[:, n:n + 3] for n, row in zip(history, z)])
        got = decode_streams(batched, chunk)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-5
        again = decode_streams(batched, chunk)  # the states were split back per stream
        ref = [d.decode(c[None]) for d, c in zip(alone, chunk)]
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(again, ref))
    with pytest.raises(ValueError, match="latents_per_pass"):
        decode_streams([vae.streaming_decoder(), vae.streaming_decoder(latents_per_pass=2)], chunk[:2])


def gen_vae_config():
    from sf_sdk.config import VAE_PRESETS

    return VAE_PRESETS["tiny"]


def test_two_threads_on_one_generator_never_mix_their_streams(gen: StreamingGenerator) -> None:
    """generate() from two threads: each either finishes with exactly its video alone, or raises the
    'superseded' error; never a corrupted video."""
    import threading

    frames = _frames(6)
    emb = [_embeds(gen, i) for i in range(2)]
    alone = [gen.generate(prompt_embeds=emb[i], seed=i, num_frames=frames).latents for i in range(2)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = gen.generate(prompt_embeds=emb[i], seed=i, num_frames=frames).latents
        except RuntimeError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    finished = 0
    for i, r in results.items():
        if isinstance(r, RuntimeError):
            assert "superseded" in str(r)
        else:
            finished += 1
            assert (r - alone[i]).abs().max() <= 1e-5
    assert len(results) == 2 and finished >= 1
