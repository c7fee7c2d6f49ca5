"""Tests that need a child Python process: a fresh interpreter (what an import pulls in), a
resource limit the kernel enforces (RLIMIT_FSIZE as a full disk), peak RSS measured from
/proc, or Triton without a C compiler. They live here because tests/unit starts no process."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from expert_store import format as fmt
from expert_store.tiers import NvmeTier
from tests.checkpoints import make_mixtral_checkpoint

REPO = Path(__file__).resolve().parents[2]
KEY = "m/experts/L000/E001.bf16.blob"   # an expert key as NvmeTier stores it
SLOT = 8192                             # arena slot bytes


def visible_files(root) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "a.arena"


def test_format_module_does_not_import_torch():
    import subprocess

    code = (
        "import sys, expert_store.format as f\n"
        "b = f.encode_blob('m', 0, 0, 'int8', [f.RawTensor('w1', (2, 2), 'int8', 0, 4, "
        "f.QuantLayout(8, 2, 16, 4))], bytes(20))\n"
        "f.check_blob(b)\n"
        "sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics checked on Linux")
def test_nvme_file_size_limit_is_a_real_full_disk(tmp_path):
    """A child process with RLIMIT_FSIZE (the kernel refuses writes past it, EFBIG) tries
    to store a blob bigger than the limit: the write fails and leaves no file at all."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from expert_store.tiers import NvmeTier
        from expert_store.errors import ResourceExhausted
        tier = NvmeTier({str(tmp_path)!r})
        tier.put("m/small.blob", b"s" * 100)
        try:
            tier.put({KEY!r}, b"x" * 100_000)
        except ResourceExhausted:
            sys.exit(7)
        sys.exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 7, proc.stderr.decode()
    tier = NvmeTier(tmp_path)
    assert tier.get("m/small.blob") == b"s" * 100
    assert not tier.contains(KEY)
    assert visible_files(tmp_path) == ["models/m/small.blob"]


def _limit_file_size() -> None:   # the child: files may not grow past 1 MiB, and saying so is not fatal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_budget_the_filesystem_cannot_hold_fails_at_start_in_one_line(path):
    """fallocate reserves the arena up front: no room is one line at start, not SIGBUS later
    (a 1 MiB file size limit stands for a memory volume's sizeLimit)."""
    code = ("import sys; from expert_store.shm_arena import ArenaWriter; "
            f"ArenaWriter.open({str(path)!r}, 64 << 20, {SLOT})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=_limit_file_size)
    assert r.returncode == 1
    assert "ResourceExhausted: cannot reserve" in r.stderr and "sizeLimit" in r.stderr
    assert not path.exists() and not list(path.parent.glob("a.arena.new-*"))


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend
    from expert_store.pack import pack_checkpoint
    from expert_store.tiers import NvmeTier

    def peak_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    ckpt, store_dir, mode = sys.argv[1:4]
    store = NvmeTier(store_dir)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
        f.write("5")
    base = rss_mib()
    if mode == "pack":
        pack_checkpoint(ckpt, store, precisions=("bf16", "int4"), progress=False)
    else:  # the naive way: every tensor in memory at once
        from safetensors.torch import load_file
        tensors = [t.clone() for t in load_file(ckpt + "/model.safetensors").values()]
    print(json.dumps({"base": base, "peak": peak_mib()}))
    """
)


def test_pack_memory_stays_bounded(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak RSS")
    # ~200 MB of float32 experts (8 layers x 8 experts x 3 MiB); the pack may grow by < 64 MiB
    ckpt, _ = make_mixtral_checkpoint(tmp_path / "big", hidden=256, ffn=1024, layers=8, experts=8, vocab=320)
    size_mib = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 2**20
    cap_mib = 64
    assert size_mib > 3 * cap_mib

    def run(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(ckpt), str(tmp_path / f"store-{mode}"), mode],
            capture_output=True, text=True, timeout=240, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
        assert out.returncode == 0, out.stderr[-2000:]
        m = json.loads(out.stdout.strip().splitlines()[-1])
        return m["peak"] - m["base"]

    growth = run("pack")
    assert growth < cap_mib, f"packing a {size_mib:.0f} MiB checkpoint grew peak RSS by {growth:.0f} MiB"
    # the measurement sees a whole-checkpoint load: the cap is one such a load would break
    assert run("load") > size_mib
    # and what was packed is complete
    manifest = json.loads(NvmeTier(tmp_path / "store-pack").get(fmt.file_key("big", "manifest.json")))
    assert len(manifest["blobs"]) == 8 * 8 * 2


CHILD = textwrap.dedent("""
    import torch
    from expert_store.quant import dequantize, quantize
    g = torch.Generator().manual_seed(5)
    for shape in ((4096, 1024), (1024, 4096), (96, 384)):
        q, s = quantize(torch.randn(shape, generator=g) * 0.02, 4, 128)
        q, s = q.cuda(), s.cuda()
        got = dequantize(q, s, 4, 128, shape, torch.bfloat16)
        want = dequantize(q, s, 4, 128, shape, torch.bfloat16, kernel="torch")
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), shape
    from expert_store import dequant_kernels
    print("fallback:", dequant_kernels._failure)
""")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the real Triton launcher build)")
@pytest.mark.timeout(240)
def test_real_triton_without_a_c_compiler_falls_back(tmp_path):
    """The real thing: Triton, an empty cache, no compiler on PATH and no CC."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "TRITON_CACHE_DIR")}
    env.update(PATH=str(empty_bin), HOME=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=220,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fallback: " in r.stdout and "fallback: None" not in r.stdout, r.stdout
    warned = [ln for ln in r.stderr.splitlines() if "int4 dequantization" in ln]
    assert len(warned) == 1, r.stderr[-3000:]
