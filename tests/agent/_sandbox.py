"""Run the agent's workload under the seccomp rules systemd derives from scanside.service, without a
running systemd: SystemCallFilter (the unit's allow list, expanded by `systemd-analyze syscall-filter`,
errno EPERM for the rest) and MemoryDenyWriteExecute (systemd 252's rules: no mmap with PROT_WRITE|PROT_EXEC,
no mprotect/pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC), installed with libseccomp
(Debian python3-seccomp) plus no_new_privs.

    python -m tests.agent._sandbox MODEL.onnx DICOM_FILE WORKDIR   -> prints "ok ..." and exits 0
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def unit_filter(unit: Path) -> tuple[set[str], set[str]]:
    """(allowed, denied) syscall names from the unit's SystemCallFilter= lines."""
    allow: set[str] = set()
    deny: set[str] = set()
    for line in unit.read_text().splitlines():
        m = re.match(r"\s*SystemCallFilter=(~?)(.*)", line)
        if m:
            names = expand(m.group(2).split())
            (deny if m.group(1) else allow).update(names)
    return allow, deny


def expand(items: list[str], seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out: set[str] = set()
    for item in items:
        if not item.startswith("@"):
            out.add(item)
            continue
        if item in seen:
            continue
        seen.add(item)
        text = subprocess.run(["systemd-analyze", "syscall-filter", item], capture_output=True, text=True,
                              check=True).stdout
        body = [x.strip() for x in text.splitlines()[1:] if x.strip() and not x.strip().startswith("#")]
        out |= expand(body, seen)
    return out


def install(allow: set[str], deny: set[str]) -> int:
    sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-seccomp
    import errno

    import seccomp  # type: ignore[import-not-found]

    mdwe = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    wx = PROT_WRITE | PROT_EXEC
    mdwe.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
    for name in ("mprotect", "pkey_mprotect"):
        mdwe.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    mdwe.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    mdwe.load()
    allowed = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    n = 0
    for name in sorted(allow - deny):
        try:
            allowed.add_rule(seccomp.ALLOW, name)
            n += 1
        except (RuntimeError, ValueError):  # a name this architecture does not have
            pass
    allowed.load()  # last: the seccomp() call itself may not be on the list
    return n


def probe_mdwe() -> bool:
    """True when W+X memory is refused (the filter is really in force)."""
    import mmap

    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return True
    return False


def workload(model: Path, dicom: Path, work: Path) -> str:
    import numpy as np
    import onnxruntime as ort
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from scanside.agent.runtime.config import load_config
    from scanside.agent.service.daemon import Agent

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8, 4)).astype(np.float32)
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert logits.shape == (1, 2) and np.isfinite(logits).all()
    pixels = dcmread(dicom).pixel_array  # compressed: pylibjpeg/openjpeg decoders
    config = load_config(**{"watch.folder": str(work / "export"), "state.dir": str(work / "state"),
                            "output.stdout": False, "cstore.enabled": True, "cstore.host": "127.0.0.1",
                            "cstore.port": 0})
    agent = Agent(config).start()
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", agent.receiver.address[1], ae_title="SCANSIDE")
        assert assoc.is_established
        status = assoc.send_c_echo().Status
        assoc.release()
        assert status == 0 and agent.healthy()
    finally:
        agent.stop()
    return f"logits={logits.ravel().tolist()} pixels={pixels.shape}"


def main() -> int:
    model, dicom, work = (Path(a) for a in sys.argv[1:4])
    unit = Path(__file__).resolve().parents[2] / "systemd" / "scanside.service"
    allow, deny = unit_filter(unit)
    import mmap  # noqa: F401  (imported before the filter so the probe itself needs no new syscalls)

    n = install(allow, deny)
    if not probe_mdwe():
        print("filter not in force", file=sys.stderr)
        return 3
    print(f"ok syscalls_allowed={n} {workload(model, dicom, work)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
