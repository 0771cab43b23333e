#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include "exp.skel.h"
static volatile int stop;
static unsigned long long nrec, nbytes;
static void on_sig(int s) { (void)s; stop = 1; }
static int on_rec(void *ctx, void *data, size_t sz) { (void)ctx; (void)data; nrec++; nbytes += sz; return 0; }
int main(int argc, char **argv) {
    struct exp_bpf *s = exp_bpf__open_and_load();
    if (!s) { fprintf(stderr, "load failed\n"); return 1; }
    for (int i = 1; i < argc; i++) { __u32 p = atoi(argv[i]); __u8 one = 1; bpf_map_update_elem(bpf_map__fd(s->maps.targets), &p, &one, BPF_ANY); }
    if (exp_bpf__attach(s)) { fprintf(stderr, "attach failed\n"); return 1; }
    struct ring_buffer *rb = ring_buffer__new(bpf_map__fd(s->maps.rb), on_rec, NULL, NULL);
    signal(SIGINT, on_sig); signal(SIGTERM, on_sig);
    fprintf(stderr, "ready\n");
    while (!stop) { usleep(100000); ring_buffer__consume(rb); }
    ring_buffer__consume(rb);
    for (int i = 0; i < 7; i++) fprintf(stderr, "cnt%d=%llu ", i, (unsigned long long)s->bss->cnt[i]);
    fprintf(stderr, "records=%llu drops=%llu\n", nrec, (unsigned long long)s->bss->drops);
    return 0;
}
