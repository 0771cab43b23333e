// SPDX-License-Identifier: GPL-2.0-only
/*
 * Socket syscalls of the traced processes → one ring-buffer record per data syscall.
 *
 * Filter in the kernel, parse in userspace (DESIGN.md §4): everything not from a target TGID and not on
 * a TCP socket returns at once; a traced syscall yields its timestamp, connection id, direction, full
 * length and at most SS_HEAD_MAX bytes of its buffer. HTTP is parsed by the agent.
 *
 * Hooks are tracepoints (stable ABI; kprobes and fentry are unavailable on the target kernels). Data
 * is seen either on the data syscalls' tracepoints (sys_enter saves the arguments, keyed by thread;
 * sys_exit emits, when the byte count is known and received bytes are in the buffer) or, on 6.3+, on
 * the socket tracepoints sock_send_length/sock_recv_length, which run only for socket traffic and
 * decide like an exit whose entry was not seen (docs/decisions.md R39). The agent attaches one set.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "events.h"

char LICENSE[] SEC("license") = "GPL";

#if defined(__TARGET_ARCH_arm64)
/*
 * vmlinux.h is generated on x86 (`cargo xtask vmlinux`): CO-RE relocates every kernel field the
 * programs read, so one header serves both architectures, except for the saved registers, whose
 * layout is the architecture's own. bpf_tracing.h reads arm64 arguments through the UAPI
 * user_pt_regs (arch/arm64/include/uapi/asm/ptrace.h, a fixed layout that starts the kernel's
 * pt_regs), which an x86 header lacks; the syscall number is relocated against the kernel's pt_regs.
 * A vmlinux.h generated on arm64 would have user_pt_regs already: drop this one then.
 */
struct user_pt_regs {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
};

struct pt_regs___ss_arm64 {
	__s32 syscallno;
} __attribute__((preserve_access_index));
#elif !defined(__TARGET_ARCH_x86)
#error "the eBPF programs are built for x86 and arm64 only (agent/build.rs)"
#endif

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define S_IFIFO 0010000

/* Set by the agent before load (EbpfLoader::override_global); the verifier prunes what is off. */
const volatile __u8 trace_unix = 0;
/* Process events for discovery (SS_EV_EXEC / SS_EV_LISTEN); set by the agent before load. */
const volatile __u8 watch_exec = 0;
const volatile __u8 watch_listen = 0;
/* Unread bytes in the ring buffer at which a record wakes the agent (see submit()). */
const volatile __u64 wakeup_bytes = 0;
/*
 * `--hooks-only`: every program returns before it reads anything, so that what a traced server
 * still loses is the kernel's own cost of running a BPF program at these hooks (the tracepoint or
 * uprobe, the program's dispatch), apart from anything servescope does there. Off, it costs a
 * program three instructions (the constant's load, a compare, a branch not taken: `bpftool prog
 * dump xlated`), and the verifier walks only the path the constant allows.
 */
const volatile __u8 hooks_only = 0;
#define HOOKS_ONLY_RETURN()             \
	do {                            \
		if (hooks_only)         \
			return 0;       \
	} while (0)

/* TGIDs to trace, maintained by the agent's discovery. Value: SS_TARGET_* flags. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} targets SEC(".maps");

/*
 * The same flags by TGID in an array (layout in events.h), kept by the agent beside `targets`: what
 * every socket call and data syscall on the host asks first. Its lookup is inlined by the verifier
 * (a bounds check and a load), where the thread's task storage and the generation it was decided
 * under cost a helper call and two map reads (R58: 156 -> 103 ns a run of `ss_sock_recv` for a
 * process not traced, ~75 of it the statistics' clock reads).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SS_PID_LIMIT / SS_TARGETS_PER_WORD);
	__type(key, __u32);
	__type(value, __u64);
} target_bits SEC(".maps");

struct conn_info {
	__u64 id;
	__u8 family;
	__u8 accepted;
	/* Per direction (index SS_DIR_INGRESS: requests, SS_DIR_EGRESS: responses), whether the kernel
	 * knows this TCP connection's message boundaries: set at a fresh connection's start, cleared for
	 * good at the first message it cannot frame (http_framing). A byte each, so that the two
	 * directions' threads never rewrite each other's. */
	__u8 framed[2];
	/* A frontend's worker socket: bytes of the inference frame being written that are still to
	 * come (the frame's first write was partial), so that its continuation is not walked as a frame. */
	__u32 otf_skip;
	/* The socket this entry was made for (socket hooks only, R39): an fd number that names another
	 * socket now was closed and reused unseen, since no close() is hooked there. */
	__u64 sk;
	/* Per direction (as `framed`): bytes of the current message's Content-Length body still to
	 * come, which the kernel counts down without copying any of them (R50). */
	__u32 body_left[2];
};

/*
 * Live connections of traced processes. LRU: a connection whose close was never seen (process killed)
 * ages out instead of filling the map; an evicted live one is picked up again with a new id, which the
 * agent treats like a connection that was open before it started.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ss_conn_key);
	__type(value, struct conn_info);
} conns SEC(".maps");

/* With the socket hooks (R39): the `conns` entry of each traced TCP socket, so that its end, seen by
 * inet_sock_set_state in whatever context the state changes, finds the (tgid, fd) it was keyed by. */
struct sk_conn {
	struct ss_conn_key key;
	__u64 id;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sk_conn);
} sk_conns SEC(".maps");

/* What a thread's current syscall is doing, between its sys_enter and sys_exit. */
enum call_state {
	CALL_NONE = 0, /* no sys_enter seen: the exit decides from the saved registers (R3, R34) */
	CALL_SKIP = 1, /* a data syscall on an fd that is not a traced socket: the exit does nothing */
	CALL_DATA = 2, /* a data syscall on a traced connection: arguments and connection below */
};

/*
 * Per-thread state of a traced process's thread. `gen` is the `targets_gen` it was decided under: the
 * agent bumps that generation on every change to `targets`, so a thread of a process that stopped (or
 * started) being traced is re-checked at its next syscall instead of trusting a stale answer.
 */
struct task_state {
	__u64 buf;      /* buffer, iovec array or msghdr, per `sys` */
	__u64 iovcnt;   /* iovec count for readv/writev */
	__u64 enter_ns; /* when the syscall entered (0: not seen) */
	__u64 gen;      /* targets_gen when `target` was decided */
	__u64 conn_id;  /* the connection, copied at entry: the exit needs no second lookup */
	__u64 ignored;  /* bit n: fd n (< 64) is known not to be traced, as of fd_epoch (below) */
	__u64 fd_epoch; /* the `fd_epoch` under which `ignored` was learnt */
	__s32 fd;
	__u8 target;    /* the thread's process's SS_TARGET_* flags (0: untraced), as of gen */
	__u8 state;     /* enum call_state */
	__u8 sys;       /* enum ss_syscall of the pending call */
	__u8 family;
	__u8 accepted;
	__u8 _pad[7];
};

#ifdef SS_TASK_STORAGE
/*
 * Thread state lives in task-local storage: found from the task itself, freed with it, no hashing and
 * no delete per syscall (a hash map keyed by thread costs an update at every entry and a lookup plus a
 * delete at every exit: the largest part of a traced syscall's cost; bench/RESULTS.md). Threads of
 * untraced processes get none. Needs task storage in tracepoint programs; older kernels load the
 * SS_TASK_STORAGE=0 build of this file (probes.rs).
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_state);
} tstate SEC(".maps");

static __always_inline struct task_state *state_get(int create)
{
	return bpf_task_storage_get(&tstate, bpf_get_current_task_btf(), 0,
				    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}
#else
/* Compatibility build: the same state in an LRU hash keyed by pid_tgid; threads that exit age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct task_state);
} tstate SEC(".maps");

static __always_inline struct task_state *state_get(int create)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct task_state *t = bpf_map_lookup_elem(&tstate, &id);
	if (t || !create)
		return t;
	struct task_state zero = {};
	if (bpf_map_update_elem(&tstate, &id, &zero, BPF_NOEXIST) && bpf_map_update_elem(&tstate, &id, &zero, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&tstate, &id);
}
#endif

/* Generation of `targets` (index 0), bumped by the agent after every change to it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} targets_gen SEC(".maps");

/*
 * Bumped (index 0) whenever an fd of a target may start naming something else: close, dup2/dup3,
 * accept, exec. A thread's `ignored` mask is trusted only under the epoch it was learnt in, so a log
 * fd whose number goes to a socket is looked up again. Read-mostly: under keep-alive traffic a target
 * closes an fd a few times a second, not per request.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fd_epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024);
} events SEC(".maps");

/* Records the kernel could not deliver, by enum ss_loss. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SS_LOSS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

/* Next connection id (index 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} conn_seq SEC(".maps");

/*
 * http_framing's scan of a head. In map memory, not on the stack: the verifier knows nothing of a
 * value it reads back from a map, so each bpf_loop step starts from the same state and the callback
 * is checked once (on the stack, each step's offsets and findings made new states: ~60k processed
 * instructions in every data program, start-up 0.25 → 2 s).
 */
struct http_scan {
	__u32 len;    /* bytes of the head copied */
	__u32 pos;    /* next byte to look at */
	__u32 line;   /* where the current line starts */
	__u32 end;    /* just past the blank line that ends the headers (0: not seen) */
	__u32 cl;     /* where Content-Length's value starts (0: no such header) */
	__u32 cl_end; /* the '\n' ending that value's line */
	__u32 bad;    /* a framing the kernel does not follow (see http_framing) */
	__u32 digits; /* of Content-Length's value, read so far */
	__u64 value;
	/* Kept here, not in registers: each value a register held made the verifier walk the rest of
	 * the function once more (see http_framing, data_tail). */
	__u32 no_body;      /* a 1xx, 204 or 304 response */
	__u32 head_request; /* a HEAD request */
	__u32 pending;      /* data_tail: the call begins a message on a framed connection */
};

/* Per-CPU scratch record: too big for the 512-byte BPF stack. The spill area keeps iovec copies that
 * start near the end of data[] inside the map value, so the verifier can bound them simply. */
struct scratch {
	struct ss_event ev;
	__u8 spill[SS_HEAD_MAX];
	__u64 walk_off; /* otf_frame's head length and frame_int's offset, read back through map memory */
	struct http_scan scan;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_buf SEC(".maps");

/* Per-CPU scratch for SS_EV_BATCH records: a record header whose data[] runs on into `more`, with
 * slack past SS_BATCH_DATA_MAX so that a masked offset plus a bounded id length stays in the value. */
struct batch_scratch {
	struct ss_event ev;
	__u8 more[SS_BATCH_DATA_MAX - SS_HEAD_MAX + SS_BATCH_ID_MAX + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct batch_scratch);
} batch_buf SEC(".maps");

static __always_inline void count_loss(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&losses, &which);
	if (v)
		*v += 1;
}

/* `tgid`'s SS_TARGET_* flags in `target_bits`: 0 when it is not traced. */
static __always_inline __u32 target_bits_of(__u32 tgid)
{
	__u32 word = tgid / SS_TARGETS_PER_WORD;
	__u64 *w = bpf_map_lookup_elem(&target_bits, &word);
	/* Past PID_MAX_LIMIT (not a TGID Linux hands out): `targets` decides. */
	if (!w)
		return SS_TARGET_TRACED;
	return (*w >> (tgid % SS_TARGETS_PER_WORD * 2)) & (SS_TARGET_TRACED | SS_TARGET_WORKER);
}

/* The SS_TARGET_* flags of `tgid`; 0 when it is not traced. */
static __always_inline __u32 target_flags(__u32 tgid)
{
	if (!target_bits_of(tgid))
		return 0;
	__u32 *flags = bpf_map_lookup_elem(&targets, &tgid);
	return flags ? *flags : 0;
}

static __always_inline int is_target(__u32 tgid)
{
	return target_bits_of(tgid) && bpf_map_lookup_elem(&targets, &tgid) != NULL;
}

/* The socket behind `fd` in the current task when it is a stream socket of a traced family, else NULL;
 * its family in *family. */
static __always_inline struct sock *stream_sock(int fd, __u8 *family)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt)
		return NULL;
	if ((unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	umode_t mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *sock = BPF_CORE_READ(file, private_data);
	if (!sock || BPF_CORE_READ(sock, type) != SOCK_STREAM)
		return NULL;
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return NULL;
	__u16 fam = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (fam == AF_INET || fam == AF_INET6 || (trace_unix && fam == AF_UNIX)) {
		*family = fam;
		return sk;
	}
	return NULL;
}

/* The file type and mode of `fd` in the current task (0 when it is not open). */
static __always_inline umode_t fd_mode(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	return BPF_CORE_READ(file, f_inode, i_mode);
}

/*
 * Whether `fd` is a pipe of a TorchServe worker target (SS_TARGET_WORKER): the worker prints its
 * `[METRICS]` lines to its stdout pipe. `flags` are the target's (cached per thread), so processes
 * without the flag pay nothing here.
 */
static __always_inline int worker_pipe(__u32 flags, int fd)
{
	return (flags & SS_TARGET_WORKER) && (fd_mode(fd) & S_IFMT) == S_IFIFO;
}

/* Emits the SS_EV_OPEN record of a newly tracked connection, with the client's address (sk NULL: a
 * worker's pipe). */
static __always_inline void emit_open(__u64 pid_tgid, int fd, struct conn_info *c, struct sock *sk);

static __always_inline struct conn_info *new_conn(struct ss_conn_key *key, __u8 family, __u8 accepted)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&conn_seq, &zero);
	if (!seq)
		return NULL;
	struct conn_info info = {
		.id = __sync_fetch_and_add(seq, 1) + 1,
		.family = family,
		.accepted = accepted,
	};
	/* A stream seen from its first byte starts at a message boundary both ways. */
	if (accepted && (family == AF_INET || family == AF_INET6)) {
		info.framed[SS_DIR_INGRESS] = 1;
		info.framed[SS_DIR_EGRESS] = 1;
	}
	if (bpf_map_update_elem(&conns, key, &info, BPF_ANY)) {
		count_loss(SS_LOSS_CONNS_FULL);
		return NULL;
	}
	return bpf_map_lookup_elem(&conns, key);
}

/*
 * `family` of a `conns` entry for an fd of a target that is not traced (a log file, a UDP socket, a
 * pipe of a non-worker): remembered so that the next write to it costs one lookup instead of a walk
 * of the fd table (the JVM writes its log files ~30 times per request). Never sent to the agent.
 * Valid until the fd number is reused, which goes through close() (the entry is deleted), dup2/dup3
 * (likewise), or accept() (which overwrites it).
 */
#define FAMILY_IGNORED 0

/* The connection behind (tgid, fd), NULL when the fd is not traced (then *ignored is 1 when that is
 * because of what the fd is, not for want of map space); a socket first seen mid-stream (open before
 * the agent started, or evicted) is adopted here with accepted = 0. */
static __always_inline struct conn_info *get_conn(__u64 pid_tgid, int fd, __u32 flags, int *ignored)
{
	struct ss_conn_key key = { .tgid = pid_tgid >> 32, .fd = fd };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	if (c) {
		if (c->family != FAMILY_IGNORED)
			return c;
		*ignored = 1;
		return NULL;
	}
	__u8 family = 0;
	struct sock *sk = stream_sock(fd, &family);
	if (!sk) {
		if (!worker_pipe(flags, fd)) {
			struct conn_info entry = { .family = FAMILY_IGNORED };
			bpf_map_update_elem(&conns, &key, &entry, BPF_ANY);
			*ignored = 1;
			return NULL;
		}
		family = SS_FAMILY_PIPE;
	}
	c = new_conn(&key, family, 0);
	if (c)
		emit_open(pid_tgid, fd, c, sk);
	return c;
}

/* The `conns` entry of the call `a` (its fd, under the connection id it began with). */
static __always_inline struct conn_info *conn_of(__u64 id, struct task_state *a)
{
	struct ss_conn_key key = { .tgid = id >> 32, .fd = a->fd };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	return c && c->id == a->conn_id ? c : NULL;
}

static __always_inline struct scratch *get_scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&scratch_buf, &zero);
}

static __always_inline void fill_header(struct ss_event *ev, __u64 pid_tgid, int fd, struct conn_info *c,
					__u8 kind, __u8 dir, __u8 sys, __u64 len)
{
	ev->ts_ns = bpf_ktime_get_ns();
	ev->conn_id = c->id;
	ev->len = len;
	ev->tgid = pid_tgid >> 32;
	ev->tid = (__u32)pid_tgid;
	ev->fd = fd;
	ev->head_len = 0;
	ev->kind = kind;
	ev->dir = dir;
	ev->syscall = sys;
	ev->family = c->family;
	ev->accepted = c->accepted;
	ev->flags = 0;
	ev->busy_us = 0;
}

/*
 * Waking the reader for every record costs a self-interrupt per syscall (irq_work; in a VM a trap to
 * the hypervisor) and a context switch: the largest share of the agent's overhead. Only the record
 * that makes the unread data cross a multiple of wakeup_bytes wakes it; below the first the agent
 * drains on its own timer (probes::DRAIN_INTERVAL). Waking on every record past the mark, as this did
 * first, turned each record into an irq_work for as long as the reader took to be scheduled on a busy
 * machine. A crossing two CPUs race past unseen is caught at the next multiple or by the timer.
 */
static __always_inline __u64 wakeup_flags(__u64 size)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	if (!wakeup_bytes)
		return 0;
	return avail / wakeup_bytes != (avail + size) / wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void submit(struct ss_event *ev)
{
	__u32 head = ev->head_len;
	if (head > SS_HEAD_MAX)
		head = SS_HEAD_MAX;
	__u64 size = offsetof(struct ss_event, data) + head;
	if (bpf_ringbuf_output(&events, ev, size, wakeup_flags(size)))
		count_loss(SS_LOSS_RINGBUF_FULL);
}

static __always_inline void emit_open(__u64 pid_tgid, int fd, struct conn_info *c, struct sock *sk)
{
	struct scratch *s = get_scratch();
	if (!s)
		return;
	fill_header(&s->ev, pid_tgid, fd, c, SS_EV_OPEN, SS_DIR_INGRESS, SS_SYS_ACCEPT, 0);
	if (!sk) {
		submit(&s->ev);
		return;
	}
	if (c->family == AF_UNIX) {
		/* The peer's bound path: for the frontend's end of a worker connection the worker's
		 * /tmp/.ts.sock.<port>, which ties the connection to a worker (and its load frame to it). */
		struct unix_sock *peer = (struct unix_sock *)BPF_CORE_READ((struct unix_sock *)sk, peer);
		struct unix_address *addr = peer ? BPF_CORE_READ(peer, addr) : NULL;
		if (addr) {
			int n = BPF_CORE_READ(addr, len) - (int)sizeof(__u16);
			if (n > SS_UNIX_PATH_MAX)
				n = SS_UNIX_PATH_MAX;
			/* name[] is a flexible array: address it by offset (an index into it does not
			 * relocate). sun_path follows the 2-byte sun_family (uapi). */
			const char *path = (const char *)addr + bpf_core_field_offset(struct unix_address, name) +
					   sizeof(__u16);
			if (n > 0 && !bpf_probe_read_kernel(s->ev.data, n & 127, path))
				s->ev.head_len = n & 127;
		}
		submit(&s->ev);
		return;
	}
	struct ss_peer *peer = (struct ss_peer *)s->ev.data;
	__builtin_memset(peer, 0, sizeof(*peer));
	peer->family = c->family;
	peer->port = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (c->family == AF_INET)
		BPF_CORE_READ_INTO(&peer->addr, sk, __sk_common.skc_daddr);
	else if (c->family == AF_INET6)
		BPF_CORE_READ_INTO(&peer->addr, sk, __sk_common.skc_v6_daddr);
	s->ev.head_len = sizeof(*peer);
	submit(&s->ev);
}

/* Copies the head of one flat user buffer (read, write, recvfrom, sendto). */
static __always_inline void copy_flat(struct ss_event *ev, const void *buf, __u64 len)
{
	__u32 n = len > SS_HEAD_MAX ? SS_HEAD_MAX : (__u32)len;
	asm volatile("" : "+r"(n)); /* keep the clamp visible to the verifier */
	if (n > SS_HEAD_MAX)
		n = SS_HEAD_MAX;
	if (n && !bpf_probe_read_user(ev->data, n, buf))
		ev->head_len = n;
}

/* Copies the head of an iovec array: the first SS_IOV_MAX vectors, at most `len` bytes in all. */
static __always_inline void copy_iov(struct scratch *s, const struct iovec *iov, __u64 iovcnt, __u64 len)
{
	__u32 off = 0;
	for (int i = 0; i < SS_IOV_MAX; i++) {
		if (i >= iovcnt || off >= SS_HEAD_MAX || off >= len)
			break;
		struct iovec v;
		if (bpf_probe_read_user(&v, sizeof(v), &iov[i]))
			break;
		__u64 n = v.iov_len;
		if (n > SS_HEAD_MAX - off)
			n = SS_HEAD_MAX - off;
		if (n > len - off)
			n = len - off;
		__u32 at = off & (SS_HEAD_MAX - 1);
		__u32 cnt = n & (SS_HEAD_MAX - 1 + SS_HEAD_MAX);
		if (cnt > SS_HEAD_MAX)
			cnt = SS_HEAD_MAX;
		if (cnt && bpf_probe_read_user(s->ev.data + at, cnt, v.iov_base))
			break;
		off += cnt;
	}
	s->ev.head_len = off > SS_HEAD_MAX ? SS_HEAD_MAX : off;
}

static __always_inline int sys_is_ingress(__u8 sys)
{
	return sys == SS_SYS_READ || sys == SS_SYS_READV || sys == SS_SYS_RECVFROM || sys == SS_SYS_RECVMSG;
}

static __always_inline __u64 targets_generation(void)
{
	__u32 zero = 0;
	__u64 *genp = bpf_map_lookup_elem(&targets_gen, &zero);
	return genp ? *genp : 0;
}

static __always_inline __u64 current_fd_epoch(void)
{
	__u32 zero = 0;
	__u64 *e = bpf_map_lookup_elem(&fd_epoch, &zero);
	return e ? *e : 0;
}

/* An fd of a target may name something new from now on: every thread's `ignored` mask is stale. */
static __always_inline void bump_fd_epoch(void)
{
	__u32 zero = 0;
	__u64 *e = bpf_map_lookup_elem(&fd_epoch, &zero);
	if (e)
		__sync_fetch_and_add(e, 1);
}

/*
 * The state of the current thread when its process is traced, else NULL; `targets` is consulted again
 * only when its generation changed. Callers ask `target_bits` first, so threads of processes that
 * are not traced never get here and get no state. (Should the bits and `targets` disagree for a
 * moment while the agent changes them, the task-storage build keeps a "not traced" answer until the
 * generation, bumped after both, moves on; the hash build keeps nothing for such a thread.)
 */
static __always_inline struct task_state *traced_thread_of(struct task_state *t, __u64 id)
{
	__u64 gen = targets_generation();
	if (t && t->gen == gen)
		return t->target ? t : NULL;
	__u32 target = target_flags(id >> 32);
	if (!t) {
#ifndef SS_TASK_STORAGE
		if (!target)
			return NULL;
#endif
		t = state_get(1);
		if (!t) {
			if (target)
				count_loss(SS_LOSS_ARGS_FULL);
			return NULL;
		}
	}
	t->gen = gen;
	t->target = target;
	t->state = CALL_NONE;
	t->ignored = 0;
	return target ? t : NULL;
}

/* traced_thread_of the thread's state as stored now; a thread of a process not traced is answered
 * from `target_bits` alone. */
static __always_inline struct task_state *traced_thread(__u64 id)
{
	if (!target_bits_of(id >> 32))
		return NULL;
	return traced_thread_of(state_get(0), id);
}

/* Whether the thread's mask says `fd` is not traced (a stale mask is reset before it is asked). */
static __always_inline int fd_ignored(struct task_state *t, int fd)
{
	return fd >= 0 && fd < 64 && ((t->ignored >> (fd & 63)) & 1);
}

/* Remembers in the thread's mask that `fd` is not traced, whatever the syscall. */
static __always_inline void remember_ignored(struct task_state *t, int fd)
{
	if (fd < 64)
		t->ignored |= 1ULL << (fd & 63);
}

/*
 * sys_enter of a data syscall: decide here whether `fd` is a traced connection, so that the exit of a
 * syscall on anything else (the JVM writes its log files ~30 times per request) costs one state read.
 * Such fds are remembered per thread (`ignored`), so that the next write to them skips the `conns`
 * lookup too: in a busy JVM that hash bucket is a cache miss nearly every time.
 */
static __always_inline int enter_data_of(struct task_state *t, __u64 id, int fd, __u64 buf, __u64 iovcnt,
					 __u8 sys)
{
	if (!t)
		return 0;
	t->sys = sys;
	t->state = CALL_SKIP;
	if (fd < 0)
		return 0;
	/* The epoch is read before `conns`: an fd reused after this read bumps it, and the mask learnt
	 * below is dropped at this thread's next data syscall. */
	__u64 epoch = current_fd_epoch();
	if (t->fd_epoch != epoch) {
		t->fd_epoch = epoch;
		t->ignored = 0;
	}
	if (fd_ignored(t, fd))
		return 0;
	int ignored = 0;
	struct conn_info *c = get_conn(id, fd, t->target, &ignored);
	if (!c) {
		if (ignored)
			remember_ignored(t, fd);
		return 0;
	}
	/* Of a worker's pipes only what it writes matters (its stdout/stderr, the `[METRICS]` lines). */
	if (c->family == SS_FAMILY_PIPE && sys_is_ingress(sys))
		return 0;
	/* A worker's own socket traffic (~25 field-by-field reads per request) is not needed: the
	 * frontend's frames are walked where they are written (otf_frame). */
	if ((t->target & SS_TARGET_WORKER) && c->family == AF_UNIX) {
		remember_ignored(t, fd);
		return 0;
	}
	t->buf = buf;
	t->iovcnt = iovcnt;
	t->enter_ns = bpf_ktime_get_ns();
	t->fd = fd;
	t->conn_id = c->id;
	t->family = c->family;
	t->accepted = c->accepted;
	t->state = CALL_DATA;
	return 0;
}

static __always_inline int enter_data(int fd, __u64 buf, __u64 iovcnt, __u8 sys)
{
	__u64 id = bpf_get_current_pid_tgid();
	return enter_data_of(traced_thread(id), id, fd, buf, iovcnt, sys);
}

/*
 * The current task's saved user registers, which hold a syscall's arguments until it returns
 * (bpf_task_pt_regs, 5.15+); NULL before 5.15, where the verifier prunes every use.
 */
static __always_inline struct pt_regs *syscall_regs(void)
{
	if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_task_pt_regs))
		return NULL;
	/* The helper wants a trusted task pointer: the BTF one, not bpf_get_current_task()'s scalar. */
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

/*
 * A data syscall whose sys_enter was not seen, decided at its exit from the task's saved user
 * registers, which still hold its arguments there (bpf_task_pt_regs, 5.15+):
 * - reads on 5.15+, whose entry programs are not attached at all (R34): a read needs no entry time,
 *   and one program run instead of two halves what every read on the node pays;
 * - writes on 5.15+ when only TorchServe is traced (R35): its frontend never blocks in write, so a
 *   response's start is its write's exit; egress records then carry no entry time and busy_us 0;
 * - a syscall that began before its process was traced (a thread-per-connection server blocked in
 *   read() on an idle keep-alive connection when the agent starts or discovery adds the process,
 *   R3). Without this the first request on each such connection would be lost.
 * The decision is enter_data's, on the thread's own state, so an untraced fd is learnt into its mask
 * here too. `t` is the thread's state as the exit found it (NULL if it has none), so that it is not
 * looked up again. Returns 1 with the thread's state at CALL_DATA when the syscall is traced.
 */
static __always_inline int enter_from_regs(struct task_state *t, __u64 id, __u8 sys)
{
	/* On older kernels the verifier prunes this and the entry programs stay attached. */
	struct pt_regs *regs = syscall_regs();
	if (!regs)
		return 0;
	/* Plain loads, not BPF_CORE_READ: the helper returns a trusted BTF pointer, whose fields the
	 * verifier lets us load directly (fault-safe), and three bpf_probe_read_kernel calls per read
	 * were ~12 % of TorchServe's BPF time (R36). The fields still carry CO-RE relocations. */
	int fd = (__s32)PT_REGS_PARM1_SYSCALL(regs);
	/* sendfile's second argument is a file descriptor, not a buffer. */
	__u64 buf = sys == SS_SYS_SENDFILE ? 0 : PT_REGS_PARM2_SYSCALL(regs);
	/* iovec count, or for flat writes the byte count (see ss_enter_write). */
	__u64 third = (sys == SS_SYS_READV || sys == SS_SYS_WRITEV || sys == SS_SYS_WRITE || sys == SS_SYS_SENDTO)
			      ? PT_REGS_PARM3_SYSCALL(regs)
			      : 0;
	t = traced_thread_of(t, id);
	if (!t)
		return 0;
	enter_data_of(t, id, fd, buf, third, sys);
	if (t->state != CALL_DATA || t->sys != sys) {
		/* This is the exit: a CALL_SKIP left here would make the thread's next read of this
		 * syscall look like one whose entry decided to skip it. */
		t->state = CALL_NONE;
		return 0;
	}
	/* The entry time is unknown: the record is stamped at exit. */
	t->enter_ns = 0;
	return 1;
}

/*
 * Whether the current syscall's fd (first argument, from the saved registers) is in the thread's mask
 * of untraced fds, under the current fd epoch: enter_data's own early skip, without its lookups of the
 * thread's state and generation, which the exit has already made.
 */
static __always_inline int known_ignored_fd(struct task_state *t)
{
	if (!t->ignored || t->fd_epoch != current_fd_epoch())
		return 0;
	struct pt_regs *regs = syscall_regs();
	return regs && fd_ignored(t, (__s32)PT_REGS_PARM1_SYSCALL(regs));
}

/* Microseconds from `from` to `to`, saturating at the field's maximum. */
static __always_inline __u32 micros_between(__u64 from, __u64 to)
{
	__u64 us = to > from ? (to - from) / 1000 : 0;
	return us > 0xffffffffULL ? 0xffffffffU : (__u32)us;
}

/*
 * The kernel's walk of an OTF inference frame (FACTS.md §6; agent/src/otf.rs has the layout): 'I',
 * then per request an id (int32 length + bytes), headers as (name, value) pairs ended by int32 -1,
 * parameters as (name, content type, value) triples ended by int32 -1; int32 -1 after the last
 * request. One int32 is read per step, bodies are stepped over by their length, so the cost is per
 * field, not per byte, and nothing but the ids is copied. Every length is checked against the bytes
 * the frontend asked to write.
 */
#define SS_WALK_STEPS 16384

enum walk_state {
	W_ID,        /* next: a request id's length, or -1 (end of frame) */
	W_HDR_NAME,  /* next: a header name's length, or -1 (end of headers) */
	W_HDR_VALUE,
	W_PAR_NAME,  /* next: a parameter name's length, or -1 (end of the request) */
	W_PAR_TYPE,
	W_PAR_VALUE,
	W_DONE,
	W_CORRUPT,
};

struct walk {
	__u64 buf;   /* the frame in the writer's memory */
	__u64 count; /* bytes the writer handed to write() */
	__u64 off;   /* next field */
	__u32 pos;   /* next free byte of the record's data[] */
	__u32 requests;
	__u32 ids;
	__u32 state;
	__u32 head;  /* the frame's first bytes already in the data record's head (scratch_buf) */
};

/*
 * The int32 at the walk's offset as the frame has it (big-endian), in 0..2^32-1; -1 if unreadable. A
 * frame's fields up to its body usually lie in the head the data record just copied (SS_HEAD_MAX
 * bytes): those are read there, with no helper call; past it, from the writer's memory. An echo
 * request's frame is 13 steps, all in the head (R44). Returned, not stored through a pointer: both
 * ways then leave the verifier the same state, and it walks the rest of the step once.
 */
static __always_inline __s64 frame_int(struct walk *w)
{
	__u32 be;
	struct scratch *s = get_scratch();
	if (s) {
		/* Compared or indexed by w->off itself, the offset would be tracked exactly; each
		 * bpf_loop step then differs from the last and the callback never converges (8,193
		 * jumps, load refused). A value read back from map memory is unknown to the verifier. */
		s->walk_off = w->off;
		__u64 o = *(volatile __u64 *)&s->walk_off; /* read back, not the register clang holds */
		if (o + 4 <= w->head && o <= SS_HEAD_MAX - 4) {
			__builtin_memcpy(&be, &s->ev.data[o], sizeof(be));
			return be;
		}
	}
	if (bpf_probe_read_user(&be, sizeof(be), (const void *)(w->buf + w->off)))
		return -1;
	return be;
}

static long walk_step(__u32 i, struct walk *w)
{
	if (w->off + 4 > w->count) {
		w->state = W_CORRUPT;
		return 1;
	}
	__s64 be = frame_int(w);
	if (be < 0) {
		w->state = W_CORRUPT;
		return 1;
	}
	__s32 len = (__s32)__builtin_bswap32((__u32)be);
	w->off += 4;
	if (len == -1) {
		switch (w->state) {
		case W_ID:
			w->state = W_DONE;
			return 1;
		case W_HDR_NAME:
			w->state = W_PAR_NAME;
			return 0;
		case W_PAR_NAME:
			w->state = W_ID;
			return 0;
		default:
			w->state = W_CORRUPT;
			return 1;
		}
	}
	if (len < 0 || w->off + (__u64)len > w->count) {
		w->state = W_CORRUPT;
		return 1;
	}
	switch (w->state) {
	case W_ID: {
		w->requests++;
		__u32 zero = 0;
		struct batch_scratch *b = bpf_map_lookup_elem(&batch_buf, &zero);
		__u32 pos = w->pos;
		if (b && len > 0 && len <= SS_BATCH_ID_MAX && w->ids < SS_BATCH_MAX_IDS &&
		    pos + 1 + (__u32)len <= SS_BATCH_DATA_MAX) {
			__u32 n = (__u32)len & SS_BATCH_ID_MAX;
			b->ev.data[pos & (SS_BATCH_DATA_MAX - 1)] = (__u8)n;
			if (!bpf_probe_read_user(&b->ev.data[(pos + 1) & (SS_BATCH_DATA_MAX - 1)], n,
						 (const void *)(w->buf + w->off))) {
				w->pos = pos + 1 + n;
				w->ids++;
			}
		}
		w->state = W_HDR_NAME;
		break;
	}
	case W_HDR_NAME:
		w->state = W_HDR_VALUE;
		break;
	case W_HDR_VALUE:
		w->state = W_HDR_NAME;
		break;
	case W_PAR_NAME:
		w->state = W_PAR_TYPE;
		break;
	case W_PAR_TYPE:
		w->state = W_PAR_VALUE;
		break;
	case W_PAR_VALUE:
		w->state = W_PAR_NAME;
		break;
	default:
		w->state = W_CORRUPT;
		return 1;
	}
	w->off += (__u64)len;
	return 0;
}

/*
 * After a frontend's write of `ret` bytes to a worker socket (`a` holds the call): if the write starts
 * an inference frame, walk it and emit an SS_EV_BATCH record; a partial write leaves the rest of the
 * frame to later writes, which are only counted down. Returns 1 when the batch record was sent and
 * holds every request id of a whole frame: userspace needs nothing else of the write (the frame's
 * first id and time start the worker cycle), so its data record, still in the scratch, is not sent.
 * Any other frame (a load, one walked only in part, ids left out) keeps its data record.
 *
 * A global function (not static, not inlined): the verifier checks it once, on its own, with `a` as
 * any task_state. Inlined, it walked the bpf_loop callback again for each differing state the callers
 * reached it with: ss_exit_write cost 8,906 processed insns, and 106,313 once exit_data gained the
 * early skip of known_ignored_fd (R37). Now 4,063 with that skip.
 */
__noinline int otf_frame(__u64 id, struct task_state *a, long ret)
{
	if (!a)
		return 0;
	struct conn_info *c = conn_of(id, a);
	if (!c)
		return 0;
	if (c->otf_skip) {
		c->otf_skip = (__u64)ret >= c->otf_skip ? 0 : c->otf_skip - (__u32)ret;
		return 0;
	}
	/* bpf_loop is 5.17+; where it is missing (the compatibility build's kernels) the verifier
	 * prunes this and no batch records are made. */
	if (!bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_loop))
		return 0;
	/* The message this write begins ends `count` bytes on, or where the frame walked below ends; what a
	 * partial write leaves comes in the next writes, which must not be taken for frames. */
	__u64 end = a->iovcnt;
	int whole = 0;
	__u32 zero = 0;
	struct batch_scratch *b = bpf_map_lookup_elem(&batch_buf, &zero);
	/* The data record of this write, made just before (data_tail) and not sent yet, is in the
	 * scratch: its head is the frame's first bytes. Checked, not assumed, so that a walk never
	 * reads another record's bytes as this frame's. */
	struct scratch *s = get_scratch();
	if (!b || !s || a->iovcnt < 5)
		goto rest;
	__u64 head = 0;
	if (s->ev.kind == SS_EV_DATA && s->ev.conn_id == a->conn_id && s->ev.fd == a->fd &&
	    s->ev.tid == (__u32)id)
		head = s->ev.head_len;
	/* Read back through map memory (as in frame_int): a known 0 on one path and a length on the
	 * other would have the verifier walk the whole bpf_loop callback once for each. */
	s->walk_off = head;
	head = *(volatile __u64 *)&s->walk_off;
	__u8 cmd = 0;
	if (head)
		cmd = s->ev.data[0];
	else if (bpf_probe_read_user(&cmd, 1, (const void *)a->buf))
		goto rest;
	if (cmd != 'I')
		goto rest;
	struct walk w = {
		.buf = a->buf,
		.count = a->iovcnt,
		.off = 1,
		.pos = sizeof(struct ss_batch),
		.state = W_ID,
		.head = (__u32)head, /* at most SS_HEAD_MAX; frame_int bounds its reads anyway */
	};
	bpf_loop(SS_WALK_STEPS, walk_step, &w, 0);
	struct conn_info conn = { .id = a->conn_id, .family = a->family, .accepted = a->accepted };
	fill_header(&b->ev, id, a->fd, &conn, SS_EV_BATCH, SS_DIR_EGRESS, a->sys, w.off);
	if (a->enter_ns)
		b->ev.ts_ns = a->enter_ns;
	struct ss_batch *h = (struct ss_batch *)b->ev.data;
	h->requests = w.requests;
	h->status = w.state == W_DONE ? SS_BATCH_OK : w.state == W_CORRUPT ? SS_BATCH_CORRUPT : SS_BATCH_UNFINISHED;
	h->ids = (__u8)w.ids;
	h->_pad[0] = 0;
	h->_pad[1] = 0;
	__u32 pos = w.pos;
	if (pos > SS_BATCH_DATA_MAX)
		pos = SS_BATCH_DATA_MAX;
	b->ev.head_len = pos;
	__u64 size = offsetof(struct ss_event, data) + pos;
	int sent = !bpf_ringbuf_output(&events, &b->ev, size, wakeup_flags(size));
	if (!sent)
		count_loss(SS_LOSS_RINGBUF_FULL);
	if (w.state == W_DONE) {
		end = w.off;
		/* ...and the write holds nothing past it (bytes after a frame stay in a data record). */
		whole = sent && w.requests > 0 && w.ids == w.requests && w.off >= (__u64)ret;
	}
rest:
	if (end > (__u64)ret)
		c->otf_skip = end - (__u64)ret > 0xffffffffULL ? 0xffffffffU : (__u32)(end - (__u64)ret);
	return whole;
}

/*
 * HTTP/1.x message framing in the kernel (R50), so that the bytes of a Content-Length body are
 * counted down and never copied: an upload read in a hundred calls sent a hundred 512-byte heads of
 * its body to userspace, which only counted them. The kernel reads the head of a call that begins a
 * message (the copy the call's record has just made, SS_HEAD_MAX bytes at most), finds the blank line
 * that ends the headers, and from Content-Length the bytes of body that are still to come.
 *
 * Only where it cannot be wrong: a connection is framed from its first byte (a fresh one) and stops
 * being framed, for good, at the first message it cannot frame exactly: headers longer than the
 * copied head, Transfer-Encoding (chunked), no Content-Length on a response (read until close), a
 * second Content-Length or one that is not all digits, a header folded or with space before its
 * colon (a server must refuse those), two messages in one call, a HEAD request (its response says
 * Content-Length but has no body). Such a connection keeps today's copies; userspace, which frames
 * every message itself, needs nothing from the kernel's framing.
 *
 * Header names are matched without case, by 8-byte words ORed with 0x20 (a letter's case bit; '-'
 * is compared exactly), and each line's end is found a word at a time (SWAR zero-byte test), up to
 * four words a step: a step a line, not a step a byte.
 */
#define SS_FRAME_STEPS 160
#define LOWER8 0x2020202020202020ULL
#define NEWLINES 0x0a0a0a0a0a0a0a0aULL
#define LOW_BITS 0x0101010101010101ULL
#define HIGH_BITS 0x8080808080808080ULL
/* Little-endian words of the names matched: "content-", "length"(6 bytes), "transfer", "-encodin". */
#define W_CONTENT_ 0x2d746e65746e6f63ULL
#define W_LENGTH 0x00006874676e656cULL
#define W_TRANSFER 0x726566736e617274ULL
#define W_ENCODIN 0x6e69646f636e652dULL
/* A mask of a word's low `n` bytes (all eight for n >= 8): those of it that lie in the head. */
#define KEEP_LOW(n) ((n) >= 8 ? ~0ULL : ((1ULL << ((n) * 8)) - 1))

/* http_framing's result beyond a byte count. */
#define FRAME_UNKNOWN (-1)
#define FRAME_HEAD_REQUEST (-2)

/* An unaligned word of the head at `o` (masked into the scratch: the 8 bytes may run past data[],
 * into spill[], never out of the value; bytes past the head are masked off by the caller). */
static __always_inline __u64 head_word(struct scratch *s, __u32 o)
{
	/* Through a void pointer: from `&data[o]` clang infers byte alignment and assembles the word
	 * from eight byte loads; the JIT'd load of an unaligned word is one instruction on x86 and
	 * arm64 (the verifier allows it where the architecture does). */
	const __u8 *p = s->ev.data;
	p += o & (SS_HEAD_MAX - 1);
	return *(const __u64 *)(const void *)p;
}

/* bpf_loop's context for http_framing's loops: the scratch alone (its address is the same at every
 * step; what changes is in the scratch, see struct http_scan). */
struct scan_ctx {
	struct scratch *s;
};

/* A header line of `n` bytes at `line`, ending at `nl`: notes Content-Length's value, or a framing the
 * kernel does not follow (f->bad). */
static __always_inline void header_line(struct scratch *s, struct http_scan *f, __u32 line, __u32 nl, __u32 n)
{
	__u64 w = head_word(s, line);
	__u8 first = (__u8)w;
	if (first == ' ' || first == '\t') {
		f->bad = 1; /* obsolete line folding */
		return;
	}
	/* "content-" with '-' exact, then "length" and the byte after it. */
	if ((w | (LOWER8 >> 8)) == W_CONTENT_ && n >= 15) {
		__u64 w2 = head_word(s, line + 8);
		if (((w2 | LOWER8) & 0xffffffffffffULL) != W_LENGTH)
			return;
		__u8 after = (__u8)(w2 >> 48);
		if (after == ':') {
			if (f->cl)
				f->bad = 1; /* a second Content-Length */
			f->cl = line + 15;
			f->cl_end = nl;
		} else if (after == ' ' || after == '\t') {
			f->bad = 1;
		}
		return;
	}
	if ((w | LOWER8) == W_TRANSFER && n > 17) {
		__u64 w2 = head_word(s, line + 8);
		if ((w2 | (LOWER8 << 8)) == W_ENCODIN && ((__u8)head_word(s, line + 16) | 0x20) == 'g')
			f->bad = 1; /* chunked (or any coding): its end is not a count */
	}
}

/* One step: the current line's end, and the line looked at there. */
static long frame_step(__u32 i, struct scan_ctx *ctx)
{
	struct scratch *s = ctx->s;
	struct http_scan *f = &s->scan;
	__u32 pos = f->pos, line = f->line, len = f->len;
	if (pos >= len || pos >= SS_HEAD_MAX || line > pos)
		return 1; /* the headers run past the copied head */
	/* The next '\n', up to four words on: one step a line for most lines. */
	__u32 nl = 0;
	int found = 0;
#pragma unroll
	for (int k = 0; k < 4; k++) {
		__u32 p = pos + k * 8;
		if (p >= len || p >= SS_HEAD_MAX)
			return 1;
		__u32 valid = len - p;
		__u64 x = head_word(s, p) ^ NEWLINES;
		__u64 t = (x - LOW_BITS) & ~x & HIGH_BITS & KEEP_LOW(valid);
		if (t) {
			/* The lowest marked byte is the first '\n' (a borrow only marks bytes above). */
			nl = p + (__u32)((((t & -t) >> 7) * 0x0001020304050607ULL) >> 56);
			found = 1;
			break;
		}
	}
	if (!found) {
		f->pos = pos + 32;
		return 0;
	}
	__u32 n = nl - line; /* the line's bytes, its '\r' included */
	if (n == 0 || (n == 1 && s->ev.data[line & (SS_HEAD_MAX - 1)] == '\r')) {
		f->end = nl + 1;
		return 1;
	}
	f->line = nl + 1;
	f->pos = nl + 1;
	if (line != 0)
		header_line(s, f, line, nl, n);
	if (f->bad)
		return 1;
	/* A blank line next ends the headers here, without a step of its own. */
	__u16 next = (__u16)head_word(s, nl + 1);
	if (nl + 2 < len && next == 0x0a0d) {
		f->end = nl + 3;
		return 1;
	}
	return 0;
}

/* Content-Length's value: [OWS] 1*DIGIT [OWS] ['\r']; anything else is a value not trusted. */
#define SS_LENGTH_STEPS 40

static long length_step(__u32 i, struct scan_ctx *ctx)
{
	struct scratch *s = ctx->s;
	struct http_scan *f = &s->scan;
	__u32 pos = f->pos;
	if (pos >= f->cl_end || pos >= SS_HEAD_MAX)
		return 1;
	__u8 c = s->ev.data[pos & (SS_HEAD_MAX - 1)];
	if (c >= '0' && c <= '9') {
		/* Digits after the spaces that ended the number, or more than 15 of them. */
		if (f->digits >= 15 || (f->digits && s->ev.data[(pos - 1) & (SS_HEAD_MAX - 1)] < '0')) {
			f->bad = 1;
			return 1;
		}
		f->value = f->value * 10 + (c - '0');
		f->digits++;
	} else if (!(c == ' ' || c == '\t' || (c == '\r' && pos + 1 == f->cl_end))) {
		f->bad = 1;
		return 1;
	}
	f->pos = pos + 1;
	return 0;
}

/*
 * The framing of the message the current call begins (its head is in the scratch, just copied), `ret`
 * bytes long, `dir` its direction: the body bytes still to come after this call (0: the message ends
 * with it), FRAME_HEAD_REQUEST for a whole HEAD request, FRAME_UNKNOWN when the kernel cannot frame it.
 */
static __always_inline long long http_framing(struct scratch *s, __u32 dir, long ret)
{
	if (ret <= 0)
		return FRAME_UNKNOWN;
	__u32 len = s->ev.head_len;
	if (len < 16 || len > SS_HEAD_MAX)
		return FRAME_UNKNOWN;
	__u64 w = head_word(s, 0);
	int head_request = 0;
	int no_body = 0;
	if (dir == SS_DIR_EGRESS) {
		/* "HTTP/1.x NNN": 1xx, 204 and 304 have no body whatever their headers say. */
		if ((w & 0xf0ffffffffffffffULL) != 0x302e312f50545448ULL ||
		    s->ev.data[8] != ' ')
			return FRAME_UNKNOWN;
		__u8 d0 = s->ev.data[9], d1 = s->ev.data[10], d2 = s->ev.data[11];
		if (d0 < '1' || d0 > '5' || d1 < '0' || d1 > '9' || d2 < '0' || d2 > '9')
			return FRAME_UNKNOWN;
		__u32 status = (d0 - '0') * 100 + (d1 - '0') * 10 + (d2 - '0');
		no_body = status < 200 || status == 204 || status == 304;
	} else {
		/* The methods whose requests a server frames by Content-Length alone. */
		__u32 w4 = (__u32)w;
		if (w4 == 0x20544547 /* "GET " */ || w4 == 0x20545550 /* "PUT " */) {
		} else if ((w & 0xffffffffffULL) == 0x2054534f50ULL /* "POST " */) {
		} else if ((w & 0xffffffffffULL) == 0x2044414548ULL /* "HEAD " */) {
			head_request = 1;
		} else if ((w & 0xffffffffffffULL) == 0x204843544150ULL /* "PATCH " */) {
		} else if ((w & 0xffffffffffffffULL) == 0x204554454c4544ULL /* "DELETE " */) {
		} else if (w == 0x20534e4f4954504fULL /* "OPTIONS " */) {
		} else {
			return FRAME_UNKNOWN; /* CONNECT, TRACE, extensions: not followed */
		}
	}
	struct http_scan *f = &s->scan;
	__builtin_memset(f, 0, sizeof(*f));
	f->len = len;
	f->no_body = no_body;
	f->head_request = head_request;
	struct scan_ctx ctx = { .s = s };
	bpf_loop(SS_FRAME_STEPS, frame_step, &ctx, 0);
	if (f->bad || !f->end)
		return FRAME_UNKNOWN;
	__u64 end = f->end;
	__u64 body = 0;
	if (f->cl) {
		f->pos = f->cl;
		bpf_loop(SS_LENGTH_STEPS, length_step, &ctx, 0);
		if (f->bad || !f->digits || f->pos < f->cl_end)
			return FRAME_UNKNOWN;
		body = f->value;
	} else if (dir == SS_DIR_EGRESS && !f->no_body) {
		return FRAME_UNKNOWN; /* a response without a length ends at the close */
	}
	if (f->no_body || f->head_request)
		body = 0;
	__u64 total = end + body;
	if (total < (__u64)ret)
		return FRAME_UNKNOWN; /* another message follows in this call: not followed */
	if (f->head_request)
		return total == (__u64)ret ? FRAME_HEAD_REQUEST : FRAME_UNKNOWN;
	return (long long)(total - (__u64)ret);
}

/*
 * Frames the message the call `a` (direction `dir`, `ret` bytes) begins, on its framed connection,
 * from the head just copied into the scratch: the body still to come is counted down from here on,
 * or the connection stops being framed in that direction. A global function: the verifier checks it
 * and its loops once a program (see otf_frame); it looks the connection up itself, so that no
 * connection pointer stays live across data_tail's copy (each such value walks the copy again).
 */
__noinline int http_frame(__u64 id, struct task_state *a, __u32 dir, long ret)
{
	struct scratch *s = get_scratch();
	if (!a || !s)
		return 0;
	struct conn_info *c = conn_of(id, a);
	if (!c)
		return 0;
	long long more = http_framing(s, dir, ret);
	if (more == FRAME_HEAD_REQUEST) {
		c->framed[SS_DIR_EGRESS] = 0;
	} else if (more < 0 || more > 0xffffffffLL) {
		c->framed[dir & 1] = 0;
		return 0;
	} else {
		c->body_left[dir & 1] = (__u32)more;
	}
	/* The record carries the message's head and nothing after it: the start of a body that came
	 * in the same call (a small upload, an inference result) stays in the kernel, as the rest of
	 * the body does. The parser needs the headers alone; it counts the body by the call's length. */
	__u32 end = s->scan.end;
	if (end && end < s->ev.head_len)
		s->ev.head_len = (__u16)end;
	return 0;
}

static __always_inline int data_tail(__u64 id, struct task_state *a, long ret, __u8 dir, __u8 sys,
				     struct conn_info *conn);

static __always_inline int exit_data(long ret, __u8 dir, __u8 sys)
{
	__u64 id = bpf_get_current_pid_tgid();
	/* Every read and write on the host comes here: one that no target makes stops at the bitmap.
	 * (A call entered just before its process stopped being traced stays pending in the thread's
	 * state; the thread's next entry, under the generation bumped since, resets it.) */
	if (!target_bits_of(id >> 32))
		return 0;
	struct task_state a;
	struct task_state *t = state_get(0);
	if (t && t->state != CALL_NONE && t->sys == sys) {
		__u8 state = t->state;
		t->state = CALL_NONE;
		if (state != CALL_DATA || ret <= 0)
			return 0;
		a = *t;
	} else {
		/* No entry of this syscall seen: a read on 5.15+, or a call that began before its process
		 * was traced (or a stale entry from before every program was attached). */
		if (t) {
			t->state = CALL_NONE;
			if (t->gen == targets_generation()) {
				/* A thread known to be untraced, under the current generation: nothing to
				 * recover. */
				if (!t->target)
					return 0;
				/* A traced thread's call on an fd it has learnt is untraced (the JVM's log
				 * writes, ~33 per TorchServe request): the fd is all that must be read. */
				if (known_ignored_fd(t))
					return 0;
			}
		}
		if (ret <= 0 || !enter_from_regs(t, id, sys))
			return 0;
		/* Looked up again rather than passed back: clang then carries nothing enter_from_regs
		 * stored into `a`, and this path shares the tail below with the other. */
		t = state_get(0);
		if (!t)
			return 0;
		t->state = CALL_NONE;
		a = *t;
	}
	return data_tail(id, &a, ret, dir, sys, NULL);
}

/* The record of a traced data call `a` (its connection, buffer and count in the fields exit_data
 * copies from the thread's state; a stack copy, never the map value) that moved `ret` bytes; `conn`
 * is its `conns` entry when the caller has it. */
static __always_inline int data_tail(__u64 id, struct task_state *a, long ret, __u8 dir, __u8 sys,
				     struct conn_info *conn)
{
	struct scratch *s = get_scratch();
	if (!s)
		return 0;
	struct conn_info c = { .id = a->conn_id, .family = a->family, .accepted = a->accepted };
	fill_header(&s->ev, id, a->fd, &c, SS_EV_DATA, dir, sys, (__u64)ret);
	/*
	 * Sent bytes are stamped when the write began: a blocking write of a large response to a slow
	 * client returns only once the kernel has queued all of it, but its first bytes (the status line)
	 * left at entry. Stamping at exit would turn time-to-first-byte into time-to-last-byte; the time
	 * the write took goes in busy_us, so the end of the response is known too.
	 */
	if (dir == SS_DIR_EGRESS && a->enter_ns) {
		s->ev.busy_us = micros_between(a->enter_ns, s->ev.ts_ns);
		s->ev.ts_ns = a->enter_ns;
	}

	/* A TCP connection the kernel frames (R50, http_framing): a call inside a message's body is
	 * counted down and sent with no head; a call that begins a message is framed once copied. */
	s->scan.pending = 0;
	if (a->family == AF_INET || a->family == AF_INET6) {
		if (!conn)
			conn = conn_of(id, a);
		if (conn) {
			__u32 left = conn->body_left[dir & 1];
			if (left && (__u64)ret <= left) {
				conn->body_left[dir & 1] = left - (__u32)ret;
				s->ev.flags = SS_FLAG_BODY;
				submit(&s->ev);
				return 0;
			}
			if (left) {
				/* The body ends inside this call and something follows it: not followed. */
				conn->body_left[dir & 1] = 0;
				conn->framed[dir & 1] = 0;
			} else {
				s->scan.pending = conn->framed[dir & 1];
			}
		}
	}

	/* A TorchServe frontend's worker socket (R51): of its reads (the workers' replies, which carry
	 * the inference results) the agent reads the status code alone; a write that continues an
	 * inference frame (its request bodies) is counted down, and nothing of it is sent. */
	__u64 copy = (__u64)ret;
	if (a->family == AF_UNIX && !(a->target & SS_TARGET_WORKER)) {
		if (dir == SS_DIR_INGRESS) {
			if (copy > SS_UNIX_REPLY_HEAD)
				copy = SS_UNIX_REPLY_HEAD;
		} else if (sys == SS_SYS_WRITE || sys == SS_SYS_SENDTO) {
			if (!conn)
				conn = conn_of(id, a);
			if (conn && conn->otf_skip && (__u64)ret <= conn->otf_skip) {
				conn->otf_skip -= (__u32)ret;
				return 0;
			}
		}
	}

	/* `sys`, not `a->sys`: both branches checked them equal, and a constant lets clang fold this
	 * switch. On the copy the verifier walks every case twice (R34: start-up 135 → 659 ms). */
	switch (sys) {
	case SS_SYS_READ:
	case SS_SYS_RECVFROM:
	case SS_SYS_WRITE:
	case SS_SYS_SENDTO:
		copy_flat(&s->ev, (const void *)a->buf, copy);
		break;
	case SS_SYS_READV:
	case SS_SYS_WRITEV:
		copy_iov(s, (const struct iovec *)a->buf, a->iovcnt, copy);
		break;
	case SS_SYS_RECVMSG:
	case SS_SYS_SENDMSG: {
		struct user_msghdr msg;
		if (!bpf_probe_read_user(&msg, sizeof(msg), (const void *)a->buf))
			copy_iov(s, msg.msg_iov, msg.msg_iovlen, copy);
		break;
	}
	default: /* sendfile: the bytes come from a file, not a user buffer */
		break;
	}
	if (s->scan.pending)
		http_frame(id, a, dir, ret);
	/* A TorchServe frontend's frame to a worker (flat write: the whole frame is in one buffer),
	 * walked before the data record goes: an inference frame's batch record says all that record
	 * would (R45), and then the record is not sent. */
	if (a->family == AF_UNIX && dir == SS_DIR_EGRESS && !(a->target & SS_TARGET_WORKER) &&
	    (sys == SS_SYS_WRITE || sys == SS_SYS_SENDTO) && otf_frame(id, a, ret))
		return 0;
	submit(&s->ev);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_read")
int ss_enter_read(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], 0, SS_SYS_READ);
}

SEC("tracepoint/syscalls/sys_exit_read")
int ss_exit_read(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_INGRESS, SS_SYS_READ);
}

SEC("tracepoint/syscalls/sys_enter_readv")
int ss_enter_readv(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], ctx->args[2], SS_SYS_READV);
}

SEC("tracepoint/syscalls/sys_exit_readv")
int ss_exit_readv(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_INGRESS, SS_SYS_READV);
}

SEC("tracepoint/syscalls/sys_enter_recvfrom")
int ss_enter_recvfrom(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], 0, SS_SYS_RECVFROM);
}

SEC("tracepoint/syscalls/sys_exit_recvfrom")
int ss_exit_recvfrom(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_INGRESS, SS_SYS_RECVFROM);
}

SEC("tracepoint/syscalls/sys_enter_recvmsg")
int ss_enter_recvmsg(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], 0, SS_SYS_RECVMSG);
}

SEC("tracepoint/syscalls/sys_exit_recvmsg")
int ss_exit_recvmsg(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_INGRESS, SS_SYS_RECVMSG);
}

SEC("tracepoint/syscalls/sys_enter_write")
int ss_enter_write(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	/* For flat writes `iovcnt` holds the count: the frame walk (otf_frame) needs the buffer's length. */
	return enter_data((int)ctx->args[0], ctx->args[1], ctx->args[2], SS_SYS_WRITE);
}

SEC("tracepoint/syscalls/sys_exit_write")
int ss_exit_write(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_EGRESS, SS_SYS_WRITE);
}

SEC("tracepoint/syscalls/sys_enter_writev")
int ss_enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], ctx->args[2], SS_SYS_WRITEV);
}

SEC("tracepoint/syscalls/sys_exit_writev")
int ss_exit_writev(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_EGRESS, SS_SYS_WRITEV);
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int ss_enter_sendto(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], ctx->args[2], SS_SYS_SENDTO);
}

SEC("tracepoint/syscalls/sys_exit_sendto")
int ss_exit_sendto(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_EGRESS, SS_SYS_SENDTO);
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int ss_enter_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	return enter_data((int)ctx->args[0], ctx->args[1], 0, SS_SYS_SENDMSG);
}

SEC("tracepoint/syscalls/sys_exit_sendmsg")
int ss_exit_sendmsg(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_EGRESS, SS_SYS_SENDMSG);
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int ss_enter_sendfile(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	/* out_fd is the socket; the payload comes from in_fd, a file: no buffer to copy. */
	return enter_data((int)ctx->args[0], 0, 0, SS_SYS_SENDFILE);
}

SEC("tracepoint/syscalls/sys_exit_sendfile64")
int ss_exit_sendfile(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_data(ctx->ret, SS_DIR_EGRESS, SS_SYS_SENDFILE);
}

/*
 * Socket-level data hooks (docs/decisions.md R39; DESIGN.md decision 3 as revised there). On 6.3+
 * `sock_send_length` and `sock_recv_length` fire inside sock_sendmsg/sock_recvmsg, on return, for
 * socket traffic only: a log line written to a file, or any read or write of a process nobody traces,
 * runs no program at all, where a syscall tracepoint on write runs one for every write on the host.
 * The call is the syscall the task is in (its number and arguments are in the saved registers, as
 * in R3), decided on the socket itself (sock_data) and recorded as a syscall exit is (data_tail). Calls
 * outside the traced set (io_uring, sendmmsg, splice, kernel-internal sends) do not match a number
 * below and are not recorded, as with the syscall hooks. The agent attaches these programs instead
 * of the data syscalls' (probes::DataHooks::Sockets).
 */
#define MSG_PEEK 2
#define EPIPE 32
#define ECONNRESET 104
#define MSG_ERRQUEUE 0x2000

#if defined(__TARGET_ARCH_x86)
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDFILE 40
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#elif defined(__TARGET_ARCH_arm64)
#define NR_READ 63
#define NR_WRITE 64
#define NR_READV 65
#define NR_WRITEV 66
#define NR_SENDFILE 71
#define NR_SENDTO 206
#define NR_RECVFROM 207
#define NR_SENDMSG 211
#define NR_RECVMSG 212
#else
#error "syscall numbers of this architecture are missing"
#endif

/* The number of the syscall the task is in (-1 outside one), from its saved registers. */
static __always_inline long syscall_nr(void)
{
	struct pt_regs *regs = syscall_regs();
	if (!regs)
		return -1;
#if defined(__TARGET_ARCH_x86)
	return regs->orig_ax;
#else
	return ((struct pt_regs___ss_arm64 *)regs)->syscallno;
#endif
}

/* A connection of the socket hooks ended (its fd closed, or reused for another socket unseen). */
static __always_inline void emit_close(__u64 pid_tgid, int fd, struct conn_info *c)
{
	struct scratch *s = get_scratch();
	if (!s)
		return;
	fill_header(&s->ev, pid_tgid, fd, c, SS_EV_CLOSE, SS_DIR_INGRESS, SS_SYS_CLOSE, 0);
	submit(&s->ev);
}

/*
 * Bytes read from a TCP socket so far, this read included: what it received less what still waits
 * unread. Received alone (`bytes_received`) is not it: a client that sends its whole upload at once
 * has had more received than the server's first 4 KiB read took, and the connection was taken for
 * one picked up mid-stream (no framing, R50). A segment arriving meanwhile raises rcv_nxt and
 * bytes_received together; rcv_nxt is read first, so the result can only come out too large (not
 * fresh: the safe side), never equal to a later read's length by mistake. copied_seq only moves in
 * this reader's own calls.
 */
static __always_inline __u64 tcp_bytes_read(struct sock *sk)
{
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	__u32 rcv_nxt = BPF_CORE_READ(tp, rcv_nxt);
	__u64 received = BPF_CORE_READ(tp, bytes_received);
	return received - (__u32)(rcv_nxt - BPF_CORE_READ(tp, copied_seq));
}

/*
 * The `conns` entry of (tgid, fd) for `sk`, made now: the fd is first seen, or it named another
 * socket before (closed and reused, which the socket hooks do not see: the old connection is
 * reported closed here). A stream socket of a traced family gets a new connection; anything else an
 * ignored entry. A TCP connection whose first read holds every byte it has received is fresh
 * (accepted = 1: parsed from byte 0, as after a hooked accept()); otherwise it is picked up at its
 * next request boundary, like one open before the agent started.
 */
static __always_inline struct conn_info *sock_conn(__u64 id, struct ss_conn_key *key, struct conn_info *old,
						   struct sock *sk, __u16 fam, long ret, __u8 dir)
{
	if (old && old->family != FAMILY_IGNORED)
		emit_close(id, key->fd, old);
	if (BPF_CORE_READ(sk, sk_type) != SOCK_STREAM ||
	    !(fam == AF_INET || fam == AF_INET6 || (trace_unix && fam == AF_UNIX))) {
		struct conn_info entry = { .family = FAMILY_IGNORED, .sk = (__u64)sk };
		bpf_map_update_elem(&conns, key, &entry, BPF_ANY);
		return NULL;
	}
	__u8 fresh = fam != AF_UNIX && dir == SS_DIR_INGRESS && tcp_bytes_read(sk) == (__u64)ret;
	struct conn_info *c = new_conn(key, (__u8)fam, fresh);
	if (!c)
		return NULL;
	c->sk = (__u64)sk;
	if (fam != AF_UNIX) {
		__u64 skey = (__u64)sk;
		/* The socket already had a connection under another fd: it was dup'd there (a server
		 * moving a connection onto another fd number, the old one left open or closed unseen), or
		 * it is another process's copy (passed on by fork). It is one connection; the old entry is
		 * reported closed here, or nothing would end it (its socket's end finds this newest entry
		 * only). Should both fds stay in use, each switch between them starts a connection anew at
		 * its next request, as after an eviction. */
		struct sk_conn *prev = bpf_map_lookup_elem(&sk_conns, &skey);
		if (prev && (prev->key.fd != key->fd || prev->key.tgid != key->tgid)) {
			struct ss_conn_key pkey = prev->key;
			struct conn_info *p = bpf_map_lookup_elem(&conns, &pkey);
			if (p && p->id == prev->id) {
				emit_close(((__u64)pkey.tgid << 32) | pkey.tgid, pkey.fd, p);
				bpf_map_delete_elem(&conns, &pkey);
			}
		}
		struct sk_conn sc = { .key = *key, .id = c->id };
		bpf_map_update_elem(&sk_conns, &skey, &sc, BPF_ANY);
	}
	emit_open(id, key->fd, c, sk);
	return c;
}

/*
 * One socket send or receive of `ret` bytes, in syscall `sys` (the number in the saved registers
 * matched it): the decision of enter_from_regs, made on the socket itself. No fd mask: with no
 * close() hooked it could outlive its fd, and the writes it exists for (log files) run nothing here.
 */
static __always_inline int sock_data(struct sock *sk, __u64 id, struct task_state *t, __u16 fam, long ret,
				     __u8 dir, __u8 sys)
{
	struct pt_regs *regs = syscall_regs();
	if (!regs)
		return 0;
	struct ss_conn_key key = { .tgid = id >> 32, .fd = (__s32)PT_REGS_PARM1_SYSCALL(regs) };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	if (!c || c->sk != (__u64)sk) {
		c = sock_conn(id, &key, c, sk, fam, ret, dir);
		if (!c)
			return 0;
	}
	if (c->family == FAMILY_IGNORED)
		return 0;
	struct task_state a = {
		.buf = sys == SS_SYS_SENDFILE ? 0 : PT_REGS_PARM2_SYSCALL(regs),
		/* iovec count, or for flat writes the byte count (the frame walk's bound) */
		.iovcnt = (sys == SS_SYS_READV || sys == SS_SYS_WRITEV || sys == SS_SYS_WRITE || sys == SS_SYS_SENDTO)
				  ? PT_REGS_PARM3_SYSCALL(regs)
				  : 0,
		.conn_id = c->id,
		.fd = key.fd,
		.target = t->target,
		.sys = sys,
		.family = c->family,
		.accepted = c->accepted,
	};
	return data_tail(id, &a, ret, dir, sys, c);
}

/*
 * The end of a traced unix connection: end of stream, or the reset or broken pipe of a peer that
 * went away (a TorchServe worker killed with a request still unread gives its frontend ECONNRESET,
 * not EOF). Unix sockets have no state tracepoint, so this is where the socket hooks see such a
 * connection end; a TCP one ends in ss_sock_state instead, when this side closes too.
 */
static __always_inline int unix_end(struct sock *sk, __u64 id, __u16 fam)
{
	if (fam != AF_UNIX)
		return 0;
	struct pt_regs *regs = syscall_regs();
	if (!regs)
		return 0;
	struct ss_conn_key key = { .tgid = id >> 32, .fd = (__s32)PT_REGS_PARM1_SYSCALL(regs) };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	if (!c || c->sk != (__u64)sk || c->family == FAMILY_IGNORED)
		return 0;
	emit_close(id, key.fd, c);
	bpf_map_delete_elem(&conns, &key);
	return 0;
}

/*
 * The current thread's state when its process is traced and `sk` is a socket it may trace, with the
 * socket's family in `fam`; NULL otherwise. First in both socket hooks, before the syscall number:
 * it is all that runs for an untraced thread (nearly every socket call on the host) and for a
 * TorchServe worker's own unix socket traffic (~25 field-by-field reads per request, not needed: the
 * frontend's frames are walked where they are written, otf_frame). Both are decided from
 * `target_bits` and the socket's family before the thread's state is looked up. The family is a
 * direct load: the tracepoint's socket is a trusted BTF pointer, so no probe-read helper call is
 * needed.
 */
static __always_inline struct task_state *sock_thread(struct sock *sk, __u64 id, __u16 *fam)
{
	__u32 bits = target_bits_of(id >> 32);
	if (!bits)
		return NULL;
	*fam = sk->__sk_common.skc_family;
	if ((bits & SS_TARGET_WORKER) && *fam == AF_UNIX)
		return NULL;
	return traced_thread_of(state_get(0), id);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(ss_sock_send, struct sock *sk, int ret, int flags)
{
	HOOKS_ONLY_RETURN();
	int end = ret == -EPIPE || ret == -ECONNRESET;
	if (ret <= 0 && !end)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u16 fam = 0;
	struct task_state *t = sock_thread(sk, id, &fam);
	if (!t)
		return 0;
	if (end)
		return unix_end(sk, id, fam);
	/* One case per syscall: data_tail wants its syscall as a constant (see its switch). */
	switch (syscall_nr()) {
	case NR_WRITE:
		return sock_data(sk, id, t, fam, ret, SS_DIR_EGRESS, SS_SYS_WRITE);
	case NR_WRITEV:
		return sock_data(sk, id, t, fam, ret, SS_DIR_EGRESS, SS_SYS_WRITEV);
	case NR_SENDTO:
		return sock_data(sk, id, t, fam, ret, SS_DIR_EGRESS, SS_SYS_SENDTO);
	case NR_SENDMSG:
		return sock_data(sk, id, t, fam, ret, SS_DIR_EGRESS, SS_SYS_SENDMSG);
	case NR_SENDFILE:
		/* Each chunk the splice hands to the socket: one record each, no head. */
		return sock_data(sk, id, t, fam, ret, SS_DIR_EGRESS, SS_SYS_SENDFILE);
	default:
		return 0;
	}
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ss_sock_recv, struct sock *sk, int ret, int flags)
{
	HOOKS_ONLY_RETURN();
	/* A peek leaves the bytes to be read again; the error queue holds no stream data. */
	if (flags & (MSG_PEEK | MSG_ERRQUEUE))
		return 0;
	int end = ret == 0 || ret == -ECONNRESET;
	if (ret < 0 && !end)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u16 fam = 0;
	struct task_state *t = sock_thread(sk, id, &fam);
	if (!t)
		return 0;
	if (end)
		return unix_end(sk, id, fam);
	switch (syscall_nr()) {
	case NR_READ:
		return sock_data(sk, id, t, fam, ret, SS_DIR_INGRESS, SS_SYS_READ);
	case NR_READV:
		return sock_data(sk, id, t, fam, ret, SS_DIR_INGRESS, SS_SYS_READV);
	case NR_RECVFROM:
		return sock_data(sk, id, t, fam, ret, SS_DIR_INGRESS, SS_SYS_RECVFROM);
	case NR_RECVMSG:
		return sock_data(sk, id, t, fam, ret, SS_DIR_INGRESS, SS_SYS_RECVMSG);
	default:
		return 0;
	}
}

#define TCP_FIN_WAIT1 4
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10

static __always_inline void emit_proc(__u64 pid_tgid, __u8 kind, __u64 arg);

/* The end of the traced TCP connection of `sk`, if it has one (found by its socket: these run in
 * whatever context the socket changes, mostly softirq, not in the connection's process). */
static __always_inline int sk_end(const struct sock *sk)
{
	__u64 skey = (__u64)sk;
	struct sk_conn *found = bpf_map_lookup_elem(&sk_conns, &skey);
	if (!found)
		return 0;
	struct sk_conn sc = *found;
	bpf_map_delete_elem(&sk_conns, &skey);
	struct conn_info *c = bpf_map_lookup_elem(&conns, &sc.key);
	if (!c || c->id != sc.id)
		return 0;
	/* The record's task is the process the connection belonged to. */
	emit_close(((__u64)sc.key.tgid << 32) | sc.key.tgid, sc.key.fd, c);
	bpf_map_delete_elem(&conns, &sc.key);
	return 0;
}

/*
 * The end of a traced TCP connection under the socket hooks, which hook no close(): FIN_WAIT1 (this
 * side closed or shut down first) or LAST_ACK (it closed after the peer). Fires for every TCP state
 * change on the host. Not at CLOSE: a reset moves the socket there while its process may still be
 * inside a send to it (a blocking write of a large response, which then returns the part that was
 * sent), and that send must still find its connection; ss_sock_destroy ends those instead.
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(ss_sock_state, const struct sock *sk, const int oldstate, const int newstate)
{
	HOOKS_ONLY_RETURN();
	/* listen() on a TCP socket, in the listener's own context and bound by then: discovery by
	 * --port without the listen syscall's tracepoint (ss_enter_listen does it for the syscall hooks). */
	if (newstate == TCP_LISTEN) {
		if (watch_listen)
			emit_proc(bpf_get_current_pid_tgid(), SS_EV_LISTEN, BPF_CORE_READ(sk, __sk_common.skc_num));
		return 0;
	}
	if (newstate != TCP_FIN_WAIT1 && newstate != TCP_LAST_ACK)
		return 0;
	return sk_end(sk);
}

/*
 * The end of a traced TCP connection that reached neither FIN_WAIT1 nor LAST_ACK (reset by the peer,
 * or closed with unread data or SO_LINGER 0, which resets it): its socket is destroyed once its
 * process has closed the fd, after any send still under way on it. Once per TCP socket on the host.
 */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(ss_sock_destroy, struct sock *sk)
{
	HOOKS_ONLY_RETURN();
	return sk_end(sk);
}

/*
 * With the socket hooks, a TorchServe worker's stdout pipe (its `[METRICS]` lines, R17) has no hook
 * of its own: the agent attaches this to libc's write() in each worker process alone (a uprobe
 * scoped to its pid), so no other process pays anything. A worker writes ~3 lines per request. The
 * record is made at entry, with the byte count asked for: a write to a blocking pipe writes all of it.
 */
SEC("uprobe")
int BPF_KPROBE(ss_worker_write, int fd, const void *buf, __u64 count)
{
	HOOKS_ONLY_RETURN();
	__u64 id = bpf_get_current_pid_tgid();
	struct task_state *t = traced_thread(id);
	if (!t || !(t->target & SS_TARGET_WORKER) || (__s64)count <= 0 || fd < 0)
		return 0;
	struct ss_conn_key key = { .tgid = id >> 32, .fd = fd };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	if (!c) {
		umode_t mode = fd_mode(fd);
		/* A socket is the socket hooks' to decide (by its own calls, with its `sk`). */
		if ((mode & S_IFMT) == S_IFSOCK)
			return 0;
		if ((mode & S_IFMT) != S_IFIFO) {
			/* A file (log): remembered, so the next write costs one lookup. */
			struct conn_info entry = { .family = FAMILY_IGNORED };
			bpf_map_update_elem(&conns, &key, &entry, BPF_ANY);
			return 0;
		}
		c = new_conn(&key, SS_FAMILY_PIPE, 0);
		if (!c)
			return 0;
		emit_open(id, fd, c, NULL);
	}
	if (c->family != SS_FAMILY_PIPE)
		return 0;
	struct scratch *s = get_scratch();
	if (!s)
		return 0;
	fill_header(&s->ev, id, fd, c, SS_EV_DATA, SS_DIR_EGRESS, SS_SYS_WRITE, count);
	copy_flat(&s->ev, buf, count);
	submit(&s->ev);
	return 0;
}

/* accept/accept4: the returned fd starts a fresh stream, so the agent may parse it from byte 0. */
static __always_inline int exit_accept(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (ret < 0 || !is_target(id >> 32))
		return 0;
	bump_fd_epoch();
	int fd = (int)ret;
	__u8 family = 0;
	struct sock *sk = stream_sock(fd, &family);
	if (!sk)
		return 0;
	struct ss_conn_key key = { .tgid = id >> 32, .fd = fd };
	struct conn_info *c = new_conn(&key, family, 1);
	if (c)
		emit_open(id, fd, c, sk);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int ss_exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_accept(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int ss_exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	HOOKS_ONLY_RETURN();
	return exit_accept(ctx->ret);
}

/* close: free the connection's state at entry, before the fd number can be reused. */
/* `fd` of a target stops naming what it named: a traced connection is reported closed, and any entry
 * (an ignored fd's too) is forgotten. */
static __always_inline void fd_gone(int fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!is_target(id >> 32))
		return;
	/* Even with no entry: an evicted one may still be in a thread's `ignored` mask. */
	bump_fd_epoch();
	struct ss_conn_key key = { .tgid = id >> 32, .fd = fd };
	struct conn_info *c = bpf_map_lookup_elem(&conns, &key);
	if (!c)
		return;
	if (c->family != FAMILY_IGNORED) {
		struct scratch *s = get_scratch();
		if (s) {
			fill_header(&s->ev, id, key.fd, c, SS_EV_CLOSE, SS_DIR_INGRESS, SS_SYS_CLOSE, 0);
			submit(&s->ev);
		}
	}
	bpf_map_delete_elem(&conns, &key);
}

SEC("tracepoint/syscalls/sys_enter_close")
int ss_enter_close(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	fd_gone((int)ctx->args[0]);
	return 0;
}

/* dup2/dup3 close their target fd first (if open) and make it name another file. */
SEC("tracepoint/syscalls/sys_enter_dup2")
int ss_enter_dup2(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	fd_gone((int)ctx->args[1]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_dup3")
int ss_enter_dup3(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	fd_gone((int)ctx->args[1]);
	return 0;
}

/* A process event for discovery: header only, `arg` in len. */
static __always_inline void emit_proc(__u64 pid_tgid, __u8 kind, __u64 arg)
{
	struct scratch *s = get_scratch();
	if (!s)
		return;
	struct conn_info none = {};
	fill_header(&s->ev, pid_tgid, -1, &none, kind, SS_DIR_INGRESS, SS_SYS_NONE, arg);
	submit(&s->ev);
}

/* Any exec on the host: the agent reads that one process's command line (a TorchServe frontend?). */
SEC("tracepoint/sched/sched_process_exec")
int ss_exec(void *ctx)
{
	HOOKS_ONLY_RETURN();
	__u64 id = bpf_get_current_pid_tgid();
	/* exec closes the close-on-exec fds without close(). */
	if (is_target(id >> 32))
		bump_fd_epoch();
	if (!watch_exec)
		return 0;
	emit_proc(id, SS_EV_EXEC, 0);
	return 0;
}

/* The main thread of a traced process exits: the agent untracks it now rather than at its next scan. */
SEC("tracepoint/sched/sched_process_exit")
int ss_exit(void *ctx)
{
	HOOKS_ONLY_RETURN();
	__u64 id = bpf_get_current_pid_tgid();
	if ((__u32)id != (__u32)(id >> 32) || !is_target(id >> 32))
		return 0;
	emit_proc(id, SS_EV_EXIT, 0);
	return 0;
}

/* listen() on a TCP socket: with --port, the agent traces the process if the port is one it watches.
 * Taken at entry, when the socket is bound; a listen() that then fails costs the agent one check. */
SEC("tracepoint/syscalls/sys_enter_listen")
int ss_enter_listen(struct trace_event_raw_sys_enter *ctx)
{
	HOOKS_ONLY_RETURN();
	if (!watch_listen)
		return 0;
	__u8 family = 0;
	struct sock *sk = stream_sock((int)ctx->args[0], &family);
	if (!sk || family == AF_UNIX)
		return 0;
	emit_proc(bpf_get_current_pid_tgid(), SS_EV_LISTEN, BPF_CORE_READ(sk, __sk_common.skc_num));
	return 0;
}
