"""Model A for llama.cpp: the project's trained checkpoint converted with llama.cpp's own
convert_hf_to_gguf.py, then (for other types) quantized with llama-quantize.

Model A's checkpoint (benchmarks/decode.py: config.json of a MixtralForCausalLM, bf16
model.safetensors, tokenizer.json) converts as any Mixtral does, except the tokenizer: a
byte-level BPE trained on the project's corpus, whose pre-tokenizer the converter recognises
only by hashing the token ids of a test string, a hash it can know only for published
tokenizers. The pre-tokenizer is declared in tokenizer.json, so it is registered here from that
declaration: HF's ByteLevel with the GPT-2 split regex and no prefix space is llama.cpp's
`gpt-2` pre-tokenizer. Anything else stays unrecognised (the converter's own error).

    python3 benchmarks/peers/convert.py CKPT_DIR OUT.gguf [--outtype f16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import llama_src  # noqa: E402

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def llama_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for an HF tokenizer.json, where the file's own
    declaration settles it: a BPE model behind ByteLevel(add_prefix_space=False,
    use_regex=True), alone or as the only step of a Sequence, is GPT-2's."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", True):
        return "gpt-2"
    return None


def register_declared_pre_tokenizer() -> None:
    """Let the converter fall back to the tokenizer.json's declared pre-tokenizer (above)
    when its hash table does not know the tokenizer."""
    import conversion.base as base

    known = base.TextModel.get_vocab_base_pre
    if getattr(known, "adapmoe_declared", False):
        return

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            name = llama_pre_tokenizer(json.loads(path.read_text())) if path.is_file() else None
            if name is None:
                raise
            base.logger.info(f"pre-tokenizer {name!r} from {path}'s declaration (its hash is not a published one)")
            return name

    get_vocab_base_pre.adapmoe_declared = True  # type: ignore[attr-defined]
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def link_checkpoint(ckpt: Path, dst: Path) -> Path:
    """The checkpoint's files in `dst` (hard links where the filesystem allows, so a caller
    can keep a checkpoint that its writer deletes later), plus the tokenizer_config.json
    transformers needs to load tokenizer.json as it is (the converter loads it through
    AutoTokenizer; without one, the config's model_type would pick Llama's tokenizer class)."""
    dst.mkdir(parents=True, exist_ok=True)
    same = ckpt.resolve() == dst.resolve()
    for name in CHECKPOINT_FILES:
        src, out = ckpt / name, dst / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} missing: not a checkpoint that benchmarks/decode.py wrote")
        if same:
            continue
        if out.exists():
            out.unlink()
        try:
            os.link(src, out)
        except OSError:
            shutil.copy2(src, out)
    tok = json.loads((dst / "tokenizer.json").read_text())
    specials = [t["content"] for t in tok.get("added_tokens", []) if t.get("special")]
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
                           "clean_up_tokenization_spaces": False}
    if specials:
        cfg.update(eos_token=specials[0], bos_token=specials[0])
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return dst


def convert(ckpt: Path, out: Path, outtype: str = "f16", src: Path = llama_src.SRC) -> dict[str, Any]:
    """Run convert_hf_to_gguf.py (in this process) on `ckpt` with the declared pre-tokenizer
    registered; returns what was done."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(src))
    llama_src.use_gguf_py(src)
    register_declared_pre_tokenizer()
    import convert_hf_to_gguf

    argv = ["convert_hf_to_gguf.py", str(ckpt), "--outfile", str(out), "--outtype", outtype]
    saved, sys.argv = sys.argv, argv
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = saved
    return {"path": str(out), "type": outtype, "command": " ".join(argv), "seconds": round(time.perf_counter() - t0, 1)}


def convert_subprocess(ckpt: Path, out: Path, outtype: str, log: Path) -> dict[str, Any]:
    """convert() in a child process (its tensors' memory goes back when it ends)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), str(ckpt), str(out), "--outtype", outtype]
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf failed (exit {rc}); see {log}")
    return {"path": str(out), "type": outtype, "command": " ".join(cmd[1:]),
            "seconds": round(time.perf_counter() - t0, 1)}


def quantize(llama_quantize: Path, src_gguf: Path, out: Path, qtype: str, threads: int, log: Path) -> dict[str, Any]:
    """llama-quantize SRC OUT TYPE THREADS (the default mix for the type, as users run it)."""
    t0 = time.perf_counter()
    cmd = [str(llama_quantize), str(src_gguf), str(out), qtype.upper(), str(threads)]
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama-quantize failed (exit {rc}); see {log}")
    return {"path": str(out), "type": qtype, "command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"))
    a = p.parse_args(argv)
    info = convert(a.ckpt, a.out, a.outtype)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
