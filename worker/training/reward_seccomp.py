"""The reward sandbox's seccomp filter: kernel interfaces a reward function never needs, refused.

Namespaces, rlimits and a read-only filesystem contain what a function can reach; this filter
shrinks the kernel it can talk to, so one kernel bug in ptrace, bpf, io_uring, keyrings or a
network protocol is not an escape. It is a deny-list on top of bubblewrap (which loads it with
`--seccomp FD` just before it runs the interpreter): everything else stays allowed, so ordinary
Python, threads and forks included, runs unchanged. A denied call fails with EPERM, never kills,
so the function's call raises and scores 0 like any other failure.

libseccomp compiles the filter (through the `pyseccomp` ctypes binding) for its native
architecture, the one this interpreter, and so the sandbox's interpreter, makes syscalls in. A
syscall made in another ABI of the same kernel (i386's int 0x80, x32 on x86_64) would bypass
numbers checked for the native one, so those fail with EPERM too (libseccomp's bad-arch action).
"""

from __future__ import annotations

import errno
import socket
import tempfile
from typing import Any

# Debugging and reading other processes' memory; eBPF, perf and userfaultfd (favourite kernel
# exploit primitives); the kernel keyring; mounts and namespaces (a way out of the sandbox's
# view); loading kernels and modules; io_uring (syscalls that seccomp cannot see into);
# file handles (open_by_handle_at reads files by inode, past the mount namespace); and
# administration calls that only root should make. personality can turn off ASLR.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "personality",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "acct",
    "quotactl",
)
# socket() is allowed for AF_UNIX only (a socketpair between the function's own processes):
# the sandbox has no network, and every other family (netlink, packet, vsock...) is kernel
# surface with no use for a reward function.
ALLOWED_SOCKET_FAMILY = socket.AF_UNIX
# seccomp caps a filter at 4096 instructions of 8 bytes; bwrap reads it from a pipe that must hold
# it whole before bwrap runs (a pipe holds at least 64 KiB).
MAX_PROGRAM_BYTES = 4096 * 8


def seccomp_program() -> bytes:
    """The compiled BPF program for bubblewrap's --seccomp (struct sock_filter[], native endian).

    Build it once per sandbox, not per process: it costs a few milliseconds and never changes.
    """
    seccomp = _binding()
    deny = seccomp.ERRNO(errno.EPERM)
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    # seccomp_init() put in the native architecture only; anything else is refused, not allowed.
    if not syscall_filter.exist_arch(seccomp.Arch.NATIVE):
        raise RuntimeError("libseccomp built a filter without its native architecture")
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, deny)
    for name in DENIED_SYSCALLS:
        syscall_filter.add_rule(deny, _number(seccomp, name))
    family = seccomp.Arg(0, seccomp.NE, ALLOWED_SOCKET_FAMILY)
    syscall_filter.add_rule(deny, _number(seccomp, "socket"), family)
    with tempfile.TemporaryFile() as exported:
        syscall_filter.export_bpf(exported)
        exported.seek(0)
        program = exported.read()
    if not program or len(program) % 8 or len(program) > MAX_PROGRAM_BYTES:
        raise RuntimeError(f"libseccomp exported an unusable filter of {len(program)} bytes")
    return program


def _binding() -> Any:
    # pyseccomp loads libseccomp.so.2 when imported, and raises RuntimeError if it finds none.
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as exc:
        raise RuntimeError(
            "reward functions need libseccomp (the libseccomp2 package) and the pyseccomp "
            f"binding on the worker, to filter the sandbox's syscalls: {exc}"
        ) from None
    return pyseccomp


def _number(seccomp: Any, name: str) -> int:
    number = int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name))
    # __NR_SCMP_ERROR (-1): a libseccomp too old to know the call. Other negative numbers are
    # libseccomp's pseudo-syscalls for calls this architecture lacks, which it drops itself.
    if number == -1:
        raise RuntimeError(f"libseccomp on the worker does not know syscall {name!r}: upgrade libseccomp2")
    return number
