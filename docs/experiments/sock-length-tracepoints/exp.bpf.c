// Prototype (not part of the agent; see README.md): socket data capture from the sock_send_length /
// sock_recv_length tracepoints (tp_btf, kernel 6.3+) instead of syscall tracepoints. They fire inside
// sock_sendmsg/sock_recvmsg with the byte count, so only socket I/O runs a program: log-file and pipe
// writes, and every syscall of other processes, stay on the fast path. The user buffer is found from
// the syscall's saved registers (bpf_task_pt_regs), as R3 already does for a missed sys_enter.
// Per record it does what the agent's data path does in the kernel: target check, a connection-map
// lookup (here keyed by the struct sock), a ring-buffer record with a 256-byte head copy, no wakeup.
// cnt[]: 0 recv runs, 1 send runs, 2/3 recv/send with ret <= 0, 4 not a target, 5 not a flat
// read/write/readv/writev/sendto/recvfrom/sendmsg/recvmsg (io_uring, sendfile, kernel sockets), 6 emitted.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define HEAD 256
struct rec { __u64 ts; __u64 sk; __u32 tgid; __u32 tid; __s32 ret; __u16 family; __u8 dir; __u8 pad; __u32 len; __u8 data[HEAD]; };

struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024); __type(key, __u32); __type(value, __u8); } targets SEC(".maps");
struct conn { __u64 first_ts; __u64 bytes; };
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 16384); __type(key, __u64); __type(value, struct conn); } conns SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 22); } rb SEC(".maps");
__u64 drops = 0;
__u64 cnt[8];
#define C(i) __sync_fetch_and_add(&cnt[i], 1)

static __always_inline int handle(struct sock *sk, int ret, __u8 dir) {
    C(dir);
    if (ret <= 0) { C(2+dir); return 0; }
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    if (!bpf_map_lookup_elem(&targets, &tgid)) { C(4); return 0; }
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    long nr = BPF_CORE_READ(regs, orig_ax);
    const void *buf;
    switch (nr) {
    case 0: case 1: case 44: case 45:
        buf = (const void *)BPF_CORE_READ(regs, si); break;
    case 19: case 20: {
        struct iovec iov; const struct iovec *p = (const void *)BPF_CORE_READ(regs, si);
        if (bpf_probe_read_user(&iov, sizeof(iov), p)) return 0;
        buf = iov.iov_base; break; }
    case 46: case 47: {
        struct user_msghdr m; struct iovec iov;
        if (bpf_probe_read_user(&m, sizeof(m), (const void *)BPF_CORE_READ(regs, si))) return 0;
        if (bpf_probe_read_user(&iov, sizeof(iov), m.msg_iov)) return 0;
        buf = iov.iov_base; break; }
    default: C(5); return 0; // io_uring, kernel-internal, sendfile...
    }
    __u64 key = (__u64)sk;
    struct conn *c = bpf_map_lookup_elem(&conns, &key);
    if (!c) {
        struct conn z = { .first_ts = bpf_ktime_get_ns() };
        bpf_map_update_elem(&conns, &key, &z, BPF_ANY);
        c = bpf_map_lookup_elem(&conns, &key);
        if (!c) return 0;
    }
    c->bytes += ret;
    struct rec *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
    if (!r) { __sync_fetch_and_add(&drops, 1); return 0; }
    r->ts = bpf_ktime_get_ns(); r->sk = key; r->tgid = tgid; r->tid = (__u32)id; r->ret = ret;
    r->family = BPF_CORE_READ(sk, __sk_common.skc_family); r->dir = dir;
    __u32 n = ret > HEAD ? HEAD : ret; r->len = n;
    if (n > HEAD) n = HEAD;
    r->len = n;
    if (bpf_probe_read_user(r->data, n, buf)) r->len = 0;
    bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    C(6);
    return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ss_send_len, struct sock *sk, int ret, int flags) { return handle(sk, ret, 1); }
SEC("tp_btf/sock_recv_length")
int BPF_PROG(ss_recv_len, struct sock *sk, int ret, int flags) { return handle(sk, ret, 0); }
