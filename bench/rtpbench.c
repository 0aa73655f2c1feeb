/* The SIP bench's RTP load: a PCMU sender for many streams on one timer, and a sink that
 * timestamps arrivals in the kernel. Built by bench/rtpload.py with the system `cc` into
 * bench/.build/; the bench drives it over stdin/stdout (one command per line).
 *
 *   rtpbench send BURSTS_FILE
 *     add LOCAL_PORT DEST_IP DEST_PORT OFFSET MARK   one more stream; it sends from the next tick
 *                                                     (MARK >= 0: log its bursts under that index)
 *     sync                                            answers "synced" once every command before it ran
 *     window                                          restarts the lateness statistics
 *     stats                                           answers "stats WORST_MS LAGGED_TICKS TICKS"
 *     quit (or end of input)
 *   Every stream sends a 20 ms PCMU packet per tick from its own socket (bound to LOCAL_PORT, the
 *   port its SDP or join offered, and connected to DEST). A packet is silence, except once every
 *   25 ticks (when (tick + OFFSET) mod 25 = 10) a loud 1 kHz burst; a marked stream appends
 *   (uint32 index, uint32 0, int64 CLOCK_REALTIME ns just before send) to BURSTS_FILE.
 *
 *   rtpbench sink ARRIVALS_FILE BASE_PORT COUNT
 *     Binds 127.0.0.1:BASE_PORT + 2*i for i < COUNT (stream i), reads with recvmmsg and
 *     SO_TIMESTAMPNS, and appends (uint32 i, uint16 seq, uint8 loud, uint8 0, int64 kernel ns)
 *     per packet to ARRIVALS_FILE. Prints "first I" on the first packet of stream i.
 *     Commands: flush (answers "flushed"), quit.
 *
 * One timer and one epoll loop: the load costs a syscall per packet, not a process or a
 * thread per stream, so the bench measures the system under test rather than itself.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS 20000000LL
#define PAYLOAD 160
#define CYCLE 25
#define BURST_AT 10
#define BATCH 64
#define MAX_EVENTS 4096

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void raise_fd_limit(void) {
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
}

static int udp_bound(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads what stdin has without blocking; calls handle() per complete line. Returns 0 at EOF. */
static int read_commands(char *buf, size_t *len, size_t cap, int (*handle)(char *line)) {
    for (;;) {
        struct pollfd p = {.fd = 0, .events = POLLIN};
        if (poll(&p, 1, 0) <= 0)
            return 1;
        ssize_t r = read(0, buf + *len, cap - 1 - *len);
        if (r <= 0)
            return 0;
        *len += (size_t)r;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', (size_t)(buf + *len - start))) != NULL) {
            *nl = '\0';
            if (!handle(start))
                return 0;
            start = nl + 1;
        }
        *len = (size_t)(buf + *len - start);
        memmove(buf, start, *len);
        if (*len == cap - 1)
            *len = 0; /* a line longer than the buffer: drop it */
    }
}

/* ---------------------------------------------------------------- sender */

struct stream {
    int fd;
    struct sockaddr_in dest;
    int offset;
    int mark;
    int64_t first_tick;
    uint16_t seq0;
    uint32_t ts0, ssrc;
};

static struct stream *streams;
static size_t nstreams, capstreams;
static int64_t tick, window_ticks, lagged_ticks;
static double worst_ms;
static FILE *bursts;

static int sender_command(char *line) {
    int local, dport, offset, mark;
    char ip[64];
    if (sscanf(line, "add %d %63s %d %d %d", &local, ip, &dport, &offset, &mark) == 5) {
        int fd = udp_bound(local);
        if (fd < 0) {
            printf("error add %d: %s\n", local, strerror(errno));
            fflush(stdout);
            return 1;
        }
        /* Nothing is read here, but Janus sends each participant the room's mix: keep the receive
         * buffer tiny so thousands of full buffers do not push UDP into memory pressure (which
         * would drop packets at the sink too). */
        int tiny = 1;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &tiny, sizeof tiny);
        if (nstreams == capstreams) {
            capstreams = capstreams ? 2 * capstreams : 256;
            streams = realloc(streams, capstreams * sizeof *streams);
        }
        struct stream *s = &streams[nstreams++];
        memset(s, 0, sizeof *s);
        s->fd = fd;
        s->dest.sin_family = AF_INET;
        s->dest.sin_port = htons((uint16_t)dport);
        inet_pton(AF_INET, ip, &s->dest.sin_addr);
        /* connected: the kernel resolves the route once, not per packet (~20 % of the send cost) */
        if (connect(fd, (struct sockaddr *)&s->dest, sizeof s->dest) < 0) {
            printf("error connect %d: %s\n", local, strerror(errno));
            fflush(stdout);
        }
        s->offset = offset;
        s->mark = mark;
        s->first_tick = tick + 1;
        s->seq0 = (uint16_t)random();
        s->ts0 = (uint32_t)random();
        s->ssrc = (uint32_t)random();
    } else if (strcmp(line, "sync") == 0) {
        printf("synced\n");
        fflush(stdout);
    } else if (strcmp(line, "window") == 0) {
        window_ticks = lagged_ticks = 0;
        worst_ms = 0;
    } else if (strcmp(line, "stats") == 0) {
        fflush(bursts);
        printf("stats %.3f %lld %lld\n", worst_ms, (long long)lagged_ticks, (long long)window_ticks);
        fflush(stdout);
    } else if (strcmp(line, "quit") == 0) {
        return 0;
    }
    return 1;
}

static int run_sender(const char *bursts_path) {
    bursts = fopen(bursts_path, "wb");
    if (!bursts) {
        perror(bursts_path);
        return 1;
    }
    srandom((unsigned)now_ns(CLOCK_REALTIME));
    /* Ahead of the system under test when the machine is busy (best effort: needs CAP_SYS_NICE):
     * a late tick would be counted against what is measured. Real-time FIFO where allowed (it
     * sleeps between ticks and uses a fraction of a core, and the kernel's RT throttling bounds
     * it anyway), else nice -10. The `gen lag` column shows what remains. */
    struct sched_param rt = {.sched_priority = 1};
    if (sched_setscheduler(0, SCHED_FIFO, &rt) != 0)
        setpriority(PRIO_PROCESS, 0, -10);
    uint8_t silence[12 + PAYLOAD], burst[12 + PAYLOAD];
    memset(silence + 12, 0xff, PAYLOAD); /* mu-law zero */
    /* 1 kHz square wave (4 samples up, 4 down) at +-11900, loud (the sink's threshold is 8000) yet
     * two legs summed still fit 16 bits: Janus's mixer wraps around instead of clipping. */
    for (int i = 0; i < PAYLOAD; i++)
        burst[12 + i] = (i / 4) % 2 ? 0x18 : 0x98;
    char cmd[1 << 16];
    size_t cmdlen = 0;
    int64_t start = now_ns(CLOCK_MONOTONIC);
    for (tick = 0;; tick++) {
        int64_t due = start + tick * TICK_NS;
        struct timespec ts = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
        double late_ms = (double)(now_ns(CLOCK_MONOTONIC) - due) / 1e6;
        window_ticks++;
        if (late_ms > worst_ms)
            worst_ms = late_ms;
        if (late_ms > 20.0)
            lagged_ticks++;
        if (!read_commands(cmd, &cmdlen, sizeof cmd, sender_command))
            break;
        for (size_t i = 0; i < nstreams; i++) {
            struct stream *s = &streams[i];
            if (tick < s->first_tick)
                continue;
            uint32_t n = (uint32_t)(tick - s->first_tick);
            int loud = (tick + s->offset) % CYCLE == BURST_AT;
            uint8_t *pkt = loud ? burst : silence;
            pkt[0] = 0x80;
            pkt[1] = 0; /* PCMU */
            uint16_t seq = htons((uint16_t)(s->seq0 + n));
            uint32_t rtpts = htonl(s->ts0 + 160 * n), ssrc = htonl(s->ssrc);
            memcpy(pkt + 2, &seq, 2);
            memcpy(pkt + 4, &rtpts, 4);
            memcpy(pkt + 8, &ssrc, 4);
            if (loud && s->mark >= 0) {
                struct {
                    uint32_t index, pad;
                    int64_t ns;
                } rec = {(uint32_t)s->mark, 0, now_ns(CLOCK_REALTIME)};
                fwrite(&rec, sizeof rec, 1, bursts);
            }
            send(s->fd, pkt, sizeof silence, 0);
        }
    }
    fclose(bursts);
    return 0;
}

/* ---------------------------------------------------------------- sink */

static FILE *arrivals;

static int sink_command(char *line) {
    if (strcmp(line, "flush") == 0) {
        fflush(arrivals);
        printf("flushed\n");
        fflush(stdout);
    } else if (strcmp(line, "quit") == 0) {
        return 0;
    }
    return 1;
}

static int run_sink(const char *path, int base, int count) {
    arrivals = fopen(path, "wb");
    if (!arrivals) {
        perror(path);
        return 1;
    }
    uint8_t loud_byte[256];
    for (int b = 0; b < 256; b++) { /* mu-law magnitude >= 8000 of 32767 */
        int u = ~b & 0xff, exp = (u >> 4) & 7;
        int mag = ((((u & 0x0f) << 3) + 0x84) << exp) - 0x84;
        loud_byte[b] = mag >= 8000;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)count};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    int *fds = calloc((size_t)count, sizeof *fds);
    char *seen = calloc((size_t)count, 1);
    for (int i = 0; i < count; i++) {
        fds[i] = udp_bound(base + 2 * i);
        if (fds[i] < 0) {
            printf("error bind %d: %s\n", base + 2 * i, strerror(errno));
            fflush(stdout);
            return 1;
        }
        int on = 1;
        setsockopt(fds[i], SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
        ev.data.u64 = (uint64_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    printf("ready\n");
    fflush(stdout);
    static uint8_t bufs[BATCH][1500];
    static char ctrl[BATCH][64];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    char cmd[4096];
    size_t cmdlen = 0;
    static struct epoll_event events[MAX_EVENTS];
    for (;;) {
        /* Read in rounds 10 ms apart: arrival times come from the kernel, so waiting costs no
         * accuracy, and a sink that is not parked in epoll_wait needs no wake-up per packet
         * (which would otherwise be charged to the sender). */
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        for (int e = 0; e < n; e++) {
            uint64_t i = events[e].data.u64;
            if (i == (uint64_t)count) {
                if (!read_commands(cmd, &cmdlen, sizeof cmd, sink_command)) {
                    fclose(arrivals);
                    return 0;
                }
                continue;
            }
            for (;;) {
                for (int k = 0; k < BATCH; k++) {
                    iov[k] = (struct iovec){bufs[k], sizeof bufs[k]};
                    msgs[k].msg_hdr = (struct msghdr){.msg_iov = &iov[k], .msg_iovlen = 1,
                                                      .msg_control = ctrl[k], .msg_controllen = sizeof ctrl[k]};
                }
                int got = recvmmsg(fds[i], msgs, BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                for (int k = 0; k < got; k++) {
                    unsigned len = msgs[k].msg_len;
                    if (len < 12)
                        continue;
                    int64_t ns = now_ns(CLOCK_REALTIME);
                    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[k].msg_hdr); c; c = CMSG_NXTHDR(&msgs[k].msg_hdr, c))
                        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMPNS) {
                            struct timespec t;
                            memcpy(&t, CMSG_DATA(c), sizeof t);
                            ns = (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
                        }
                    uint8_t loud = 0;
                    for (unsigned b = 12; b < len && !loud; b++)
                        loud = loud_byte[bufs[k][b]];
                    struct {
                        uint32_t index;
                        uint16_t seq;
                        uint8_t loud, pad;
                        int64_t ns;
                    } rec = {(uint32_t)i, (uint16_t)(bufs[k][2] << 8 | bufs[k][3]), loud, 0, ns};
                    fwrite(&rec, sizeof rec, 1, arrivals);
                    if (!seen[i]) {
                        seen[i] = 1;
                        printf("first %llu\n", (unsigned long long)i);
                        fflush(stdout);
                    }
                }
                if (got < BATCH)
                    break;
            }
        }
    }
}

int main(int argc, char **argv) {
    raise_fd_limit();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "send") == 0)
        return run_sender(argv[2]);
    if (argc == 5 && strcmp(argv[1], "sink") == 0)
        return run_sink(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: %s send BURSTS_FILE | sink ARRIVALS_FILE BASE_PORT COUNT\n", argv[0]);
    return 2;
}
