/*
 * pjproject build configuration for the gateway's SIP workers (copied into
 * pjlib/include/pj/config_site.h by scripts/build-pjsua2.sh; any change here rebuilds the cache).
 *
 * The PyPI wheel keeps upstream's defaults: 4 calls per process, 254 bridge ports, a select()
 * ioqueue of 64 handles. A worker here holds hundreds of calls, so everything that scales
 * with calls is sized for PJSUA_MAX_CALLS.
 */

/* Call slots per process (SIPREC sessions, per-leg calls and phone calls all count). */
#define PJSUA_MAX_CALLS                 512

/* One bridge port per audio stream: a SIPREC call carries two, so 2 x calls plus players,
 * recorders and the gateway's own media ports. */
#define PJSUA_MAX_CONF_PORTS            2048

/* Sockets per ioqueue: RTP + RTCP per stream (4 per SIPREC call) plus SIP transports, with
 * headroom because closed keys linger before they are reused (an INVITE flood on the default
 * size aborted a worker in pj_ioqueue_register_sock2). Above FD_SETSIZE, so the build uses
 * epoll (--enable-epoll); the worker's RLIMIT_NOFILE must allow as many descriptors. */
#define PJ_IOQUEUE_MAX_HANDLES          4096

/* Audio only. */
#define PJMEDIA_HAS_VIDEO               0

/* Accept `Require: siprec` (RFC 7866) when the account sets siprecUse; without this 2.17
 * answers 420 Bad Extension. */
#define PJSUA_HAS_SIPREC                1

/* SIP messages up to 64 KB (default 4000 bytes): real SIPREC INVITEs are 2.3-4.3 KB and the
 * gateway accepts up to 64 KB anywhere on the path (front -> worker over loopback UDP). */
#define PJSIP_MAX_PKT_LEN               65536

/* No RTP latching: pjmedia would otherwise switch a stream's remote address to the source of
 * the first packet it gets when it never heard from its SDP peer, so one stray UDP packet to a
 * supervisor phone's (sendonly, silent) stream port would redirect the monitored audio to its
 * sender. The gateway sends RTP only toward phones, at the address their SDP names; ingress
 * legs are still received from any source (NAT), and only their RTCP goes to the SDP address. */
#define PJMEDIA_TRANSPORT_SWITCH_REMOTE_ADDR 0

/*
 * Deliberately left at upstream defaults:
 * - PJMEDIA_CONF_THREADS (the parallel conference bridge), to be measured before it is enabled.
 */
