/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The kernel/user ABI of servescope: the only types shared by the ebpf programs and the agent.
 * Mirrored by agent/src/events.rs (#[repr(C)], with compile-time size/offset asserts):
 * change both together.
 */
#ifndef SERVESCOPE_EVENTS_H
#define SERVESCOPE_EVENTS_H

/*
 * Bytes copied from each data syscall's buffer. Enough for a request line, the headers that frame a
 * message (Content-Length, Transfer-Encoding) and a status line. Never more. A call whose bytes the
 * kernel knows to be body (SS_FLAG_BODY) has none copied, and the head of a message it frames is cut
 * at the end of its headers (the start of a small body stays in the kernel); on a connection it does
 * not frame, what a head holds past its headers is parsed past and never kept (README "Privacy").
 * Power of two so the verifier can bound offsets with a mask.
 */
#define SS_HEAD_MAX 512

/* Bytes copied of a TorchServe frontend's read from a worker socket: the reply's int32 status code
 * (200 ends a model load), all the agent reads there; the rest is the workers' inference results. */
#define SS_UNIX_REPLY_HEAD 4

/* How many iovecs of a readv/writev/recvmsg/sendmsg are looked at to fill the head. */
#define SS_IOV_MAX 4

enum ss_event_kind {
	/* A data syscall on a traced connection moved `len` bytes; `data[0..head_len]` is their head. */
	SS_EV_DATA = 1,
	/* A connection starts being traced: at accept() (accepted = 1, the stream starts at a message
	 * boundary) or when first seen mid-stream (accepted = 0). data[] holds a struct ss_peer for TCP;
	 * for AF_UNIX the peer's bound path (no NUL; head_len bytes, at most SS_UNIX_PATH_MAX; the
	 * frontend's end of a worker socket names /tmp/.ts.sock.<port>); nothing for a pipe. */
	SS_EV_OPEN = 2,
	/* close() of a traced connection: its state is gone in the kernel. */
	SS_EV_CLOSE = 3,
	/*
	 * Process events for discovery, so the agent finds targets without polling /proc: a process
	 * exec'd (any process; only when the agent discovers TorchServe by command line), a traced
	 * process's main thread exited, a process called listen() on a TCP socket (only with --port;
	 * `len` holds the local port). conn_id is 0, head_len 0.
	 */
	SS_EV_EXEC = 4,
	SS_EV_EXIT = 5,
	SS_EV_LISTEN = 6,
	/*
	 * An inference frame a TorchServe frontend wrote to a worker's unix socket, walked by the kernel
	 * in the writer's own buffer (the frame's head alone cannot say how many requests a batch with
	 * large bodies holds): data[0..head_len] is a struct ss_batch, then `ids` request ids, each a
	 * 1-byte length and its bytes. ts_ns is the write's entry, len the frame's length in bytes.
	 * It comes before the write's SS_EV_DATA record, and stands in for it (none is sent) when the
	 * frame was walked to its end with every id kept and the write held nothing past it.
	 * Only these frames are seen of the frontend↔worker traffic besides the frontend's own reads and
	 * writes: the workers' field-by-field socket reads are not traced.
	 */
	SS_EV_BATCH = 7,
};

/* Data bytes an SS_EV_BATCH record may carry (its data[] is longer than SS_HEAD_MAX). Power of two. */
#define SS_BATCH_DATA_MAX 4096
/* Request ids an SS_EV_BATCH record keeps, and the longest one kept (TorchServe's are 36-char UUIDs). */
#define SS_BATCH_MAX_IDS 64
#define SS_BATCH_ID_MAX 63

/* How the kernel's walk of an inference frame ended. */
enum ss_batch_status {
	/* The frame's end (int32 -1 after the last request) was reached inside the written bytes. */
	SS_BATCH_OK = 0,
	/* A length was negative or ran past the written bytes: not a well-formed frame. */
	SS_BATCH_CORRUPT = 1,
	/* The walk's step budget ran out first (a frame with thousands of headers or requests). */
	SS_BATCH_UNFINISHED = 2,
};

/* Head of an SS_EV_BATCH record's data. */
struct ss_batch {
	__u32 requests; /* requests walked (all of them when status is SS_BATCH_OK) */
	__u8 status;    /* enum ss_batch_status */
	__u8 ids;       /* request ids that follow (at most SS_BATCH_MAX_IDS; longer ids are not kept) */
	__u8 _pad[2];
};

enum ss_direction {
	/* Bytes the traced process received (read, recvfrom, ...). */
	SS_DIR_INGRESS = 0,
	/* Bytes the traced process sent (write, sendto, ...). */
	SS_DIR_EGRESS = 1,
};

enum ss_syscall {
	SS_SYS_NONE = 0,
	SS_SYS_READ = 1,
	SS_SYS_READV = 2,
	SS_SYS_RECVFROM = 3,
	SS_SYS_RECVMSG = 4,
	SS_SYS_WRITE = 5,
	SS_SYS_WRITEV = 6,
	SS_SYS_SENDTO = 7,
	SS_SYS_SENDMSG = 8,
	SS_SYS_SENDFILE = 9,
	SS_SYS_ACCEPT = 10,
	SS_SYS_CLOSE = 11,
};

/* Indexes of the per-CPU `losses` array: every record the kernel could not deliver is counted here. */
enum ss_loss {
	/* bpf_ringbuf_output failed: the ring buffer was full. */
	SS_LOSS_RINGBUF_FULL = 0,
	/* No per-thread state could be created at sys_enter: the exit had nothing to pair with. */
	SS_LOSS_ARGS_FULL = 1,
	/* The connection map was full: a new connection could not be tracked. */
	SS_LOSS_CONNS_FULL = 2,
	SS_LOSS_MAX = 4,
};

/* Values of the `targets` map (bit flags). Every target has SS_TARGET_TRACED. */
#define SS_TARGET_TRACED 1
/* A TorchServe worker: its pipe writes (stdout/stderr, where `[METRICS]` lines go) are traced too. */
#define SS_TARGET_WORKER 2
/*
 * The `target_bits` array: the SS_TARGET_* flags of every possible TGID, two bits each, so that a
 * word (the array's u64 value) holds SS_TARGETS_PER_WORD processes. TGID t's flags are
 * (word[t / SS_TARGETS_PER_WORD] >> (t % SS_TARGETS_PER_WORD * 2)) & 3. SS_PID_LIMIT is the kernel's
 * PID_MAX_LIMIT on 64-bit (pid_max cannot be set above it): 1 MiB of array for every TGID there is.
 */
#define SS_TARGETS_PER_WORD 32
#define SS_PID_LIMIT 4194304

/* `flags` of an SS_EV_DATA record: every byte it counts is message body, by the Content-Length the
 * kernel read in the message's head (a TCP connection it framed from its start); none was copied. */
#define SS_FLAG_BODY 1

/* `family` of records from a worker's pipe (not a socket family: AF_* values stay below 64). */
#define SS_FAMILY_PIPE 255

/* Longest AF_UNIX path an SS_EV_OPEN record of a unix socket carries (sizeof(sun_path)). */
#define SS_UNIX_PATH_MAX 108

/* Key of the kernel's connection map (`conns`); the agent deletes a vanished process's entries. */
struct ss_conn_key {
	__u32 tgid;
	__s32 fd;
};

/* Payload of an SS_EV_OPEN record (in data[], head_len = sizeof(struct ss_peer)): the client's address. */
struct ss_peer {
	__u16 family; /* AF_INET or AF_INET6 (0: unknown) */
	__u16 port;   /* host byte order */
	__u8 addr[16]; /* IPv4 in the first 4 bytes, or IPv6 */
};

/* One ring-buffer record. Records are variable-length: only `data[0..head_len]` is sent. */
struct ss_event {
	__u64 ts_ns;    /* bpf_ktime_get_ns(): received bytes at syscall exit (when they arrived), sent
			 * bytes at syscall entry (when they left: a blocking write returns later), close at
			 * entry */
	__u64 conn_id;  /* unique per connection for the life of the loaded programs; survives fd reuse */
	__u64 len;      /* bytes the syscall moved (its return value); may exceed head_len */
	__u32 tgid;
	__u32 tid;
	__s32 fd;
	__u16 head_len; /* valid bytes in data[] */
	__u8 kind;      /* enum ss_event_kind */
	__u8 dir;       /* enum ss_direction */
	__u8 syscall;   /* enum ss_syscall */
	__u8 family;    /* AF_INET / AF_INET6 / AF_UNIX of the socket */
	__u8 accepted;  /* 1 if the connection was seen at accept(), 0 if picked up mid-stream */
	__u8 flags;     /* SS_FLAG_* */
	__u32 busy_us;  /* sent bytes: microseconds from syscall entry to exit (saturating), so
			 * ts_ns + busy_us is when the last byte was handed to the kernel; 0 otherwise */
	__u8 data[SS_HEAD_MAX];
};

#endif /* SERVESCOPE_EVENTS_H */
