/* The bulk page loops: the destination's receive-and-install loop and the source's
 * push loop, run from a Python thread with the GIL released (cffi releases it around
 * every call).  They return to Python only on events.
 *
 * Facts we rely on:
 *
 * - Wire shapes (protocol v1 and v2, docs/protocol.md): a frame is a msgpack header
 *   array, optionally followed by a raw payload.  The loops handle exactly two
 *   shapes and nothing else:
 *     Pages     = fixarray(5) [6, gpa, npages, request_id, nil] + npages*page_size bytes
 *     ZeroPages = fixarray(4) [7, gpa, npages, request_id]
 *   with the type code as a positive fixint, the integers in any msgpack integer
 *   encoding with a non-negative value, and nil as the checksum (none negotiated).
 *   The push loop writes integers in msgpack's shortest form, as msgpack-python does.
 * - The receive loop never reads a byte past a frame it does not handle: it peeks
 *   (MSG_PEEK) at the next header and consumes bytes only once they are known to be
 *   part of a frame it handles, or of a fast-shaped header prefix not yet complete.
 *   Those consumed bytes are handed back (handback[]) when the frame turns out not to
 *   be fast, so the Python Connection sees every other byte, untouched, in order.
 * - UFFDIO_COPY / UFFDIO_ZEROPAGE never change a present page: they stop at it with
 *   EEXIST, reporting the bytes done before it.  That is a normal race (another path
 *   installed the page): we skip the page, wake its range, and leave its bit to the
 *   path that installed it.  EAGAIN: the mm changed, retry from where it stopped.
 * - A received bit is set only after the page is in place (never before), with an
 *   atomic claim that tells this call which bits it set: each page is counted once
 *   however the install paths race.  See bitmap.c for the bitmap contract.
 * - These loops never touch registered guest memory from user space on the
 *   destination (only the kernel writes it, inside UFFDIO_COPY), so they cannot block
 *   on a missing page.  On the source they read guest RAM (zero scan, sendmsg).
 * - A context is used by one thread at a time.  Other threads may only store
 *   interrupt / jump (aligned word stores) and write the wake eventfd.
 */

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

enum {
    MIG_RX_BATCH = 1,
    MIG_RX_OTHER = 2,
    MIG_RX_EOF = 3,
    MIG_RX_IDLE = 4,
    MIG_RX_INTERRUPTED = 5,
    MIG_RX_TRUNCATED = 6,
    MIG_RX_ERROR = 7,
    MIG_RX_WANTED = 8,
};
enum { MIG_TX_BATCH = 1, MIG_TX_DONE = 2, MIG_TX_IDLE = 4, MIG_TX_INTERRUPTED = 5, MIG_TX_ERROR = 7 };

#define MIG_CODE_PAGES 6
#define MIG_CODE_ZERO 7
#define MIG_FAST_HEADER_MAX 32 /* longest fast header: 1+1+9+9+9+1 = 30 bytes */
#define MIG_INSTALL_CHUNK 1024 /* pages per install step (bounds the runs it appends) */
#define MIG_RX_MAX_RUNS 4096

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- page map lookups ---- */

static const struct mig_region *region_of_gpa(const struct mig_pagemap *m, uint64_t gpa) {
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct mig_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->nbytes) return r;
    }
    return NULL;
}

static const struct mig_region *region_of_page(const struct mig_pagemap *m, uint64_t page) {
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct mig_region *r = &m->regions[i];
        if (page >= r->first_page && page - r->first_page < r->nbytes / r->page_size) return r;
    }
    return NULL;
}

/* The range check of MemoryLayout.range_nbytes: gpa inside a region, aligned to its
 * page size, 1 <= npages, the whole range inside that region.  Returns the region or
 * NULL; *nbytes receives the size. */
static const struct mig_region *check_range(const struct mig_pagemap *m, uint64_t gpa,
                                            uint64_t npages, uint64_t *nbytes) {
    const struct mig_region *r = region_of_gpa(m, gpa);
    if (!r || npages == 0 || npages >= (1ull << 32) || (gpa & (r->page_size - 1))) return NULL;
    uint64_t n = npages * r->page_size; /* < 2^62: no overflow */
    if (n > r->nbytes - (gpa - r->gpa)) return NULL;
    *nbytes = n;
    return r;
}

/* ---- installing ---- */

static int uffd_wake(int uffd, uint64_t addr, uint64_t len) {
    struct uffdio_range rng = {.start = addr, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &rng) < 0 ? -errno : 0;
}

/* Installs the clear-bit page run [page, page+n) of region r from src (NULL: zeroes)
 * with UFFDIO_COPY / UFFDIO_ZEROPAGE, then claims the bits of what it installed. */
static int install_missing(const struct mig_pagemap *m, const struct mig_region *r,
                           uint64_t page, uint64_t n, const uint8_t *src, uint64_t *runs,
                           struct mig_install_result *res) {
    const uint64_t ps = r->page_size;
    const uint64_t dst = r->host + (page - r->first_page) * ps;
    const uint64_t len = n * ps;
    /* hugetlbfs has no UFFDIO_ZEROPAGE: copy zeroes instead. */
    const int zero_copy = !src && ps > 4096;
    uint64_t done = 0, claimed = 0; /* bytes; [claimed, done) installed but unclaimed */
    int rc = 0;
    uint64_t t0 = now_ns();
    while (done < len) {
        long ok;
        int64_t progress;
        if (src || zero_copy) {
            struct uffdio_copy c = {
                .dst = dst + done,
                .src = (uint64_t)(uintptr_t)(src ? src + done : m->zero_src),
                .len = zero_copy ? ps : len - done,
                .mode = 0,
                .copy = 0,
            };
            ok = ioctl(m->uffd, UFFDIO_COPY, &c);
            progress = ok == 0 ? (int64_t)c.len : c.copy;
        } else {
            struct uffdio_zeropage z = {.range = {.start = dst + done, .len = len - done}};
            ok = ioctl(m->uffd, UFFDIO_ZEROPAGE, &z);
            progress = ok == 0 ? (int64_t)z.range.len : z.zeropage;
        }
        int err = ok == 0 ? 0 : errno;
        if (progress > 0) done += (uint64_t)progress;
        if (err == 0 || err == EAGAIN) continue;
        /* Claim what went in before the failure (or the present page). */
        if (done > claimed) {
            res->installed_pages += mig_bitmap_claim(m->bitmap, page + claimed / ps,
                                                     (done - claimed) / ps, runs, &res->nruns);
        }
        if (err != EEXIST) {
            rc = -err;
            claimed = done;
            break;
        }
        int w = uffd_wake(m->uffd, dst + done, ps);
        if (w < 0) {
            rc = w;
            break;
        }
        res->present_pages++;
        done += ps;
        claimed = done;
    }
    res->install_ns += now_ns() - t0;
    if (rc == 0 && done > claimed)
        res->installed_pages += mig_bitmap_claim(m->bitmap, page + claimed / ps,
                                                 (done - claimed) / ps, runs, &res->nruns);
    return rc;
}

/* Installs pages [page, page+npages) (inside one region) from src, or zeroes when src
 * is NULL.  Destination (uffd >= 0): only pages whose bit is clear, with
 * UFFDIO_COPY / UFFDIO_ZEROPAGE.  Direct mode (uffd < 0): writes every page (memcpy,
 * memset; nothing when src already is the pages themselves).  Newly set bits are
 * appended to runs, which must have room for npages / 2 + 2 more pairs.  Returns 0 or
 * -errno (EINVAL: the range is not inside one region); on an error the bits of pages
 * installed before it are set. */
int mig_install(const struct mig_pagemap *m, uint64_t page, uint64_t npages,
                const uint8_t *src, uint64_t *runs, struct mig_install_result *res) {
    const struct mig_region *r = region_of_page(m, page);
    if (!r || npages == 0 || npages > r->nbytes / r->page_size - (page - r->first_page))
        return -EINVAL;
    const uint64_t ps = r->page_size;
    if (m->uffd < 0) {
        uint8_t *dst = (uint8_t *)(uintptr_t)(r->host + (page - r->first_page) * ps);
        uint64_t t0 = now_ns();
        if (!src)
            memset(dst, 0, npages * ps);
        else if (src != dst)
            memmove(dst, src, npages * ps);
        res->install_ns += now_ns() - t0;
        uint64_t got = mig_bitmap_claim(m->bitmap, page, npages, runs, &res->nruns);
        res->installed_pages += got;
        return 0;
    }
    uint64_t pos = page, end = page + npages;
    while (pos < end) {
        size_t len;
        int64_t i = mig_bitmap_find_run(m->bitmap, end, pos, 0, 0, &len);
        if (i < 0) {
            res->skipped_pages += end - pos;
            break;
        }
        res->skipped_pages += (uint64_t)i - pos;
        int rc = install_missing(m, r, (uint64_t)i, len, src ? src + ((uint64_t)i - page) * ps : NULL,
                                 runs, res);
        if (rc < 0) return rc;
        pos = (uint64_t)i + len;
    }
    return 0;
}

/* ---- msgpack: the fast header shapes, and the extent of any one object ---- */

/* A msgpack integer with a non-negative value.  Returns bytes used, 0 if incomplete,
 * -1 if the next object is not such an integer. */
static int mp_uint(const uint8_t *p, size_t n, uint64_t *v) {
    if (n < 1) return 0;
    uint8_t b = p[0];
    if (b <= 0x7f) {
        *v = b;
        return 1;
    }
    int len;
    int is_signed = 0;
    switch (b) {
    case 0xcc: len = 1; break;
    case 0xcd: len = 2; break;
    case 0xce: len = 4; break;
    case 0xcf: len = 8; break;
    case 0xd0: len = 1; is_signed = 1; break;
    case 0xd1: len = 2; is_signed = 1; break;
    case 0xd2: len = 4; is_signed = 1; break;
    case 0xd3: len = 8; is_signed = 1; break;
    default: return -1;
    }
    if (n < (size_t)len + 1) return 0;
    uint64_t x = 0;
    for (int k = 0; k < len; k++) x = x << 8 | p[1 + k];
    if (is_signed && (p[1] & 0x80)) return -1; /* negative */
    *v = x;
    return len + 1;
}

struct fast_header {
    int zero;
    uint64_t gpa, npages, request_id;
};

/* Returns the header length if p starts with a complete fast header, 0 if the bytes
 * so far are a proper prefix of one, -1 if the frame is not fast-shaped. */
static int parse_fast(const uint8_t *p, size_t n, struct fast_header *h) {
    if (n < 1) return 0;
    if (p[0] != 0x95 && p[0] != 0x94) return -1;
    if (n < 2) return 0;
    if (p[0] == 0x95 ? p[1] != MIG_CODE_PAGES : p[1] != MIG_CODE_ZERO) return -1;
    h->zero = p[0] == 0x94;
    size_t pos = 2;
    uint64_t *fields[3] = {&h->gpa, &h->npages, &h->request_id};
    for (int f = 0; f < 3; f++) {
        int k = mp_uint(p + pos, n - pos, fields[f]);
        if (k <= 0) return k;
        pos += (size_t)k;
    }
    if (!h->zero) {
        if (n < pos + 1) return 0;
        if (p[pos] != 0xc0) return -1; /* a checksum: the Connection's business */
        pos++;
    }
    return (int)pos;
}

static uint64_t be(const uint8_t *p, int len) {
    uint64_t x = 0;
    for (int k = 0; k < len; k++) x = x << 8 | p[k];
    return x;
}

/* Length of the first complete msgpack object in p[0..n): > 0, or 0 if p is a proper
 * prefix of an object, or -1 if p cannot start a valid object (the reserved byte 0xc1,
 * or more nested elements pending than max_pending). */
int64_t mig_msgpack_extent(const uint8_t *p, size_t n, uint64_t max_pending) {
    size_t pos = 0;
    uint64_t pending = 1; /* objects still to skip */
    while (pending) {
        if (pos >= n) return 0;
        uint8_t b = p[pos++];
        pending--;
        uint64_t skip = 0, add = 0;
        int lenbytes = 0, kind = 0; /* kind 1: skip = length, 2: add = length, 3: add = 2*length */
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
        } else if (b >= 0x80 && b <= 0x8f) {
            add = 2ull * (b & 0x0f);
        } else if (b >= 0x90 && b <= 0x9f) {
            add = b & 0x0f;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: lenbytes = 1; kind = 1; break;
            case 0xc5: case 0xda: lenbytes = 2; kind = 1; break;
            case 0xc6: case 0xdb: lenbytes = 4; kind = 1; break;
            case 0xc7: lenbytes = 1; kind = 1; skip = 1; break; /* ext8: + type byte */
            case 0xc8: lenbytes = 2; kind = 1; skip = 1; break;
            case 0xc9: lenbytes = 4; kind = 1; skip = 1; break;
            case 0xca: skip = 4; break;
            case 0xcb: skip = 8; break;
            case 0xcc: case 0xd0: skip = 1; break;
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xce: case 0xd2: skip = 4; break;
            case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: lenbytes = 2; kind = 2; break;
            case 0xdd: lenbytes = 4; kind = 2; break;
            case 0xde: lenbytes = 2; kind = 3; break;
            case 0xdf: lenbytes = 4; kind = 3; break;
            default: return -1; /* 0xc1 */
            }
        }
        if (lenbytes) {
            if (n - pos < (size_t)lenbytes) return 0;
            uint64_t len = be(p + pos, lenbytes);
            pos += (size_t)lenbytes;
            if (kind == 1) skip += len;
            else if (kind == 2) add = len;
            else add = 2 * len;
        }
        if (skip > n - pos) return 0;
        pos += (size_t)skip;
        pending += add;
        if (pending > max_pending) return -1;
    }
    return (int64_t)pos;
}

/* ---- waiting ---- */

/* Waits until fd has `events` or wake_fd is readable.  Returns 1 (fd ready), 2 (woken;
 * the eventfd is drained), 0 (timeout, or a signal: return to Python so that it can
 * run its handlers, e.g. KeyboardInterrupt), or -errno. */
static int wait_fd(int fd, short events, int wake_fd, int timeout_ms, uint64_t *wait_ns) {
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = wake_fd, .events = POLLIN}};
    uint64_t t0 = now_ns();
    int r = poll(p, wake_fd >= 0 ? 2 : 1, timeout_ms);
    *wait_ns += now_ns() - t0;
    if (r < 0 && errno == EINTR) return 0;
    if (r < 0) return -errno;
    if (r == 0) return 0;
    if (wake_fd >= 0 && (p[1].revents & POLLIN)) {
        uint64_t v;
        ssize_t ignored = read(wake_fd, &v, sizeof v);
        (void)ignored;
        if (!p[0].revents) return 2;
    }
    return 1;
}

/* ---- the receive loop ---- */

enum { RX_HEADER = 0, RX_PAYLOAD = 1, RX_INSTALL = 2 };

struct mig_rx {
    struct mig_rx_stats stats;
    int32_t err;
    uint32_t handback_len;
    uint64_t handback_payload;
    uint64_t handback_payload_addr;
    uint8_t handback[32];
    uint64_t *runs;
    uint32_t nruns;
    int wake_fd;
    int32_t interrupt;
    const uint8_t *wanted; /* optional: pages someone waits for (a return on install) */
    /* configuration */
    const struct mig_pagemap *map;
    int fd;
    uint8_t *staging;
    uint64_t staging_nbytes;
    uint64_t max_frame_nbytes;
    /* the frame in progress */
    int state;
    uint8_t hdr[MIG_FAST_HEADER_MAX];
    uint32_t hdr_len; /* header bytes consumed */
    uint32_t hdr_total;
    struct fast_header h;
    const struct mig_region *region;
    uint64_t page;    /* global index of the frame's first page */
    uint64_t nbytes;  /* payload size */
    uint64_t filled;  /* payload bytes received */
    uint64_t done;    /* pages installed (RX_INSTALL) */
    uint8_t *dest;    /* where the payload goes */
    uint64_t runs_storage[2 * MIG_RX_MAX_RUNS];
};

struct mig_rx *mig_rx_new(const struct mig_pagemap *map, int fd, uint8_t *staging,
                          uint64_t staging_nbytes, uint64_t max_frame_nbytes) {
    struct mig_rx *rx = calloc(1, sizeof *rx);
    if (!rx) return NULL;
    rx->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (rx->wake_fd < 0) {
        free(rx);
        return NULL;
    }
    rx->map = map;
    rx->fd = fd;
    rx->staging = staging;
    rx->staging_nbytes = staging_nbytes;
    rx->max_frame_nbytes = max_frame_nbytes;
    rx->runs = rx->runs_storage;
    return rx;
}

void mig_rx_free(struct mig_rx *rx) {
    if (!rx) return;
    close(rx->wake_fd);
    free(rx);
}

static void rx_reset(struct mig_rx *rx) {
    rx->state = RX_HEADER;
    rx->hdr_len = 0;
}

/* Hand the consumed header prefix back and forget the frame. */
static int rx_hand_back(struct mig_rx *rx, int event) {
    memcpy(rx->handback, rx->hdr, rx->hdr_len);
    rx->handback_len = rx->hdr_len;
    rx->stats.handbacks++;
    rx_reset(rx);
    return event;
}

/* recv that must return exactly n bytes already known to be queued (they were
 * peeked by this, the only reader). */
static int recv_exact_queued(int fd, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return r < 0 ? -errno : -EPROTO;
        got += (size_t)r;
    }
    return 0;
}

static int rx_wait(struct mig_rx *rx, int timeout_ms) {
    int w = wait_fd(rx->fd, POLLIN, rx->wake_fd, timeout_ms, &rx->stats.wait_ns);
    if (w < 0) {
        rx->err = -w;
        return MIG_RX_ERROR;
    }
    if (w == 0) return MIG_RX_IDLE;
    if (__atomic_load_n(&rx->interrupt, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&rx->interrupt, 0, __ATOMIC_RELEASE);
        return MIG_RX_INTERRUPTED;
    }
    return 0;
}

/* One step of reading a header.  Returns 0 to go on, or an event. */
static int rx_header(struct mig_rx *rx, int timeout_ms) {
    uint8_t buf[MIG_FAST_HEADER_MAX];
    memcpy(buf, rx->hdr, rx->hdr_len);
    ssize_t n = recv(rx->fd, buf + rx->hdr_len, sizeof buf - rx->hdr_len, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EINTR) return 0;
        if (errno == EAGAIN) return rx_wait(rx, timeout_ms);
        rx->err = errno;
        return MIG_RX_ERROR;
    }
    if (n == 0) /* EOF: clean at a boundary, else the Connection reports the truncation */
        return rx->hdr_len ? rx_hand_back(rx, MIG_RX_OTHER) : MIG_RX_EOF;
    size_t have = rx->hdr_len + (size_t)n;
    int hl = parse_fast(buf, have, &rx->h);
    if (hl < 0) return rx_hand_back(rx, MIG_RX_OTHER);
    if (hl == 0) {
        /* A fast-shaped prefix: all of it is header, take it and wait for the rest. */
        int rc = recv_exact_queued(rx->fd, rx->hdr + rx->hdr_len, (size_t)n);
        if (rc < 0) {
            rx->err = -rc;
            return MIG_RX_ERROR;
        }
        rx->hdr_len += (uint32_t)n;
        rx->stats.bytes += (uint64_t)n;
        return 0;
    }
    uint64_t nbytes = 0;
    const struct mig_region *r = check_range(rx->map, rx->h.gpa, rx->h.npages, &nbytes);
    if (!r) return rx_hand_back(rx, MIG_RX_OTHER); /* the Connection raises bad-range */
    if (!rx->h.zero && (nbytes > rx->max_frame_nbytes || (rx->map->uffd >= 0 && nbytes > rx->staging_nbytes)))
        return rx_hand_back(rx, MIG_RX_OTHER); /* frame-too-large, the Connection's words */
    rx->region = r;
    rx->page = r->first_page + (rx->h.gpa - r->gpa) / r->page_size;
    rx->hdr_total = (uint32_t)hl;
    size_t need = (size_t)hl - rx->hdr_len;
    if (rx->h.zero) {
        int rc = recv_exact_queued(rx->fd, rx->hdr + rx->hdr_len, need);
        if (rc < 0) {
            rx->err = -rc;
            return MIG_RX_ERROR;
        }
        rx->hdr_len = (uint32_t)hl;
        rx->stats.bytes += need;
        rx->state = RX_INSTALL;
        rx->done = 0;
        return 0;
    }
    rx->nbytes = nbytes;
    rx->dest = rx->map->uffd >= 0
                   ? rx->staging
                   : (uint8_t *)(uintptr_t)(r->host + (rx->h.gpa - r->gpa));
    /* The rest of the header and as much payload as is queued, in one call. */
    struct iovec iov[2] = {{rx->hdr + rx->hdr_len, need}, {rx->dest, nbytes}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    ssize_t got;
    do {
        got = recvmsg(rx->fd, &msg, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    if (got < (ssize_t)need) { /* cannot happen: those bytes were peeked */
        rx->err = got < 0 ? errno : EPROTO;
        return MIG_RX_ERROR;
    }
    rx->hdr_len = (uint32_t)hl;
    rx->stats.bytes += (uint64_t)got;
    rx->filled = (uint64_t)got - need;
    rx->state = RX_PAYLOAD;
    return 0;
}

static int rx_payload(struct mig_rx *rx, int timeout_ms) {
    while (rx->filled < rx->nbytes) {
        ssize_t n = recv(rx->fd, rx->dest + rx->filled, rx->nbytes - rx->filled, MSG_DONTWAIT);
        if (n > 0) {
            rx->filled += (uint64_t)n;
            rx->stats.bytes += (uint64_t)n;
            continue;
        }
        if (n == 0) { /* EOF inside the payload: the Connection reports it */
            rx->handback_payload = rx->filled;
            rx->handback_payload_addr = (uint64_t)(uintptr_t)rx->dest;
            return rx_hand_back(rx, MIG_RX_TRUNCATED);
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
            int ev = rx_wait(rx, timeout_ms);
            if (ev) return ev;
            continue;
        }
        rx->err = errno;
        return MIG_RX_ERROR;
    }
    rx->state = RX_INSTALL;
    rx->done = 0;
    return 0;
}

static void rx_finish_frame(struct mig_rx *rx);

/* Whether a page appended to the runs since (run `from`, of length `from_len` then)
 * is wanted. */
static int rx_hit_wanted(const struct mig_rx *rx, uint32_t from, uint64_t from_len) {
    if (!rx->wanted) return 0;
    for (uint32_t k = from; k < rx->nruns; k++) {
        size_t len;
        uint64_t first = rx->runs[2 * k], end = first + rx->runs[2 * k + 1];
        if (k == from) first += from_len; /* that part was checked before */
        if (first < end && mig_bitmap_find_run(rx->wanted, end, first, 1, 1, &len) >= 0)
            return 1;
    }
    return 0;
}

/* Installs the current frame in chunks.  Returns 0 when the frame is done,
 * MIG_RX_BATCH when the runs buffer needs emptying first, MIG_RX_WANTED when a
 * wanted page went in (the rest of the frame follows on the next call), or
 * MIG_RX_ERROR. */
static int rx_install(struct mig_rx *rx) {
    const uint64_t ps = rx->region->page_size;
    while (rx->done < rx->h.npages) {
        if (rx->nruns + MIG_INSTALL_CHUNK / 2 + 2 > MIG_RX_MAX_RUNS) return MIG_RX_BATCH;
        uint64_t n = rx->h.npages - rx->done;
        if (n > MIG_INSTALL_CHUNK) n = MIG_INSTALL_CHUNK;
        const uint8_t *src = rx->h.zero ? NULL : rx->dest + rx->done * ps;
        struct mig_install_result res = {0};
        uint32_t before = rx->nruns ? rx->nruns - 1 : 0; /* the last run may grow */
        uint64_t before_len = rx->nruns ? rx->runs[2 * before + 1] : 0;
        res.nruns = rx->nruns;
        int rc = mig_install(rx->map, rx->page + rx->done, n, src, rx->runs, &res);
        rx->nruns = res.nruns;
        rx->stats.installed_pages += res.installed_pages;
        rx->stats.skipped_pages += res.skipped_pages;
        rx->stats.present_pages += res.present_pages;
        rx->stats.install_ns += res.install_ns;
        if (rc < 0) {
            rx->err = -rc;
            return MIG_RX_ERROR;
        }
        rx->done += n;
        if (res.installed_pages && rx_hit_wanted(rx, before, before_len)) {
            if (rx->done == rx->h.npages) rx_finish_frame(rx);
            return MIG_RX_WANTED;
        }
    }
    rx_finish_frame(rx);
    return 0;
}

static void rx_finish_frame(struct mig_rx *rx) {
    rx->stats.frames++;
    if (rx->h.zero)
        rx->stats.zero_pages += rx->h.npages;
    else
        rx->stats.normal_pages += rx->h.npages;
    rx_reset(rx);
}

/* Receives and installs fast frames until an event:
 *   MIG_RX_BATCH        batch_nbytes consumed (at a frame boundary), or runs[] is full
 *   MIG_RX_OTHER        the next frame is not one this loop handles; handback[] holds
 *                       the bytes of it already consumed (feed them to the Connection)
 *   MIG_RX_EOF          the peer closed the stream at a frame boundary
 *   MIG_RX_TRUNCATED    the stream ended inside a Pages payload: handback[] is its
 *                       header, handback_payload bytes of payload lie at
 *                       handback_payload_addr (feed both, then EOF, to the Connection)
 *   MIG_RX_IDLE         no byte arrived for timeout_ms, or a signal interrupted the
 *                       wait (state kept: call again)
 *   MIG_RX_INTERRUPTED  interrupt was set (state kept)
 *   MIG_RX_WANTED       a page whose bit is set in `wanted` was just installed
 *                       (someone waits for it: answer now; state kept)
 *   MIG_RX_ERROR        err holds the errno (socket or userfaultfd)
 * runs[0..2*nruns) lists the pages this call newly installed. */
int mig_rx_run(struct mig_rx *rx, uint64_t batch_nbytes, int timeout_ms) {
    uint64_t start = rx->stats.bytes;
    rx->nruns = 0;
    rx->handback_len = 0;
    rx->handback_payload = 0;
    rx->err = 0;
    for (;;) {
        int ev = 0;
        switch (rx->state) {
        case RX_HEADER:
            if (rx->hdr_len == 0) {
                if (batch_nbytes && rx->stats.bytes - start >= batch_nbytes) return MIG_RX_BATCH;
                if (__atomic_load_n(&rx->interrupt, __ATOMIC_ACQUIRE)) {
                    __atomic_store_n(&rx->interrupt, 0, __ATOMIC_RELEASE);
                    return MIG_RX_INTERRUPTED;
                }
            }
            ev = rx_header(rx, timeout_ms);
            break;
        case RX_PAYLOAD:
            ev = rx_payload(rx, timeout_ms);
            break;
        default:
            ev = rx_install(rx);
            break;
        }
        if (ev) return ev;
    }
}

/* ---- the push loop ---- */

#define MIG_TX_IOV 1024

struct mig_tx {
    struct mig_tx_stats stats;
    int32_t err;
    int wake_fd;
    int32_t interrupt;
    int64_t jump;
    int64_t cursor;
    /* configuration */
    const struct mig_pagemap *map;
    int fd;
    uint32_t max_frame_pages;
    int wrapped;
    /* frames built but not yet fully written */
    struct iovec *iov;
    uint32_t niov, iov_pos, nframes;
    uint8_t *headers; /* MIG_FAST_HEADER_MAX bytes per frame */
    uint64_t *claimed; /* runs this claim got */
};

struct mig_tx *mig_tx_new(const struct mig_pagemap *map, int fd, uint32_t max_frame_pages) {
    struct mig_tx *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    t->iov = calloc(2 * (size_t)max_frame_pages, sizeof *t->iov);
    t->headers = calloc((size_t)max_frame_pages, MIG_FAST_HEADER_MAX);
    t->claimed = calloc(2 * ((size_t)max_frame_pages / 2 + 2), sizeof *t->claimed);
    if (t->wake_fd < 0 || !t->iov || !t->headers || !t->claimed) {
        if (t->wake_fd >= 0) close(t->wake_fd);
        free(t->iov);
        free(t->headers);
        free(t->claimed);
        free(t);
        return NULL;
    }
    t->map = map;
    t->fd = fd;
    t->max_frame_pages = max_frame_pages;
    t->jump = -1;
    return t;
}

void mig_tx_free(struct mig_tx *t) {
    if (!t) return;
    close(t->wake_fd);
    free(t->iov);
    free(t->headers);
    free(t->claimed);
    free(t);
}

/* msgpack's shortest encoding of an unsigned integer. */
static size_t put_uint(uint8_t *p, uint64_t v) {
    if (v <= 0x7f) {
        p[0] = (uint8_t)v;
        return 1;
    }
    int len;
    if (v <= 0xff) {
        p[0] = 0xcc;
        len = 1;
    } else if (v <= 0xffff) {
        p[0] = 0xcd;
        len = 2;
    } else if (v <= 0xffffffffull) {
        p[0] = 0xce;
        len = 4;
    } else {
        p[0] = 0xcf;
        len = 8;
    }
    for (int k = 0; k < len; k++) p[1 + k] = (uint8_t)(v >> (8 * (len - 1 - k)));
    return (size_t)len + 1;
}

/* Encodes the header of Pages (zero == 0) or ZeroPages into p; returns its length.
 * Exactly msgpack.packb([6, gpa, npages, request_id, None]) / ([7, gpa, npages,
 * request_id]). */
size_t mig_encode_page_header(uint8_t *p, int zero, uint64_t gpa, uint64_t npages,
                              uint64_t request_id) {
    size_t n = 0;
    p[n++] = zero ? 0x94 : 0x95;
    p[n++] = zero ? MIG_CODE_ZERO : MIG_CODE_PAGES;
    n += put_uint(p + n, gpa);
    n += put_uint(p + n, npages);
    n += put_uint(p + n, request_id);
    if (!zero) p[n++] = 0xc0;
    return n;
}

/* Builds the frames of claimed run [page, page+n) of region r: maximal runs of
 * all-zero pages as ZeroPages, the rest as Pages whose payload is guest RAM itself. */
static void tx_build(struct mig_tx *t, const struct mig_region *r, uint64_t page, uint64_t n) {
    const uint64_t ps = r->page_size;
    const uint8_t *base = (const uint8_t *)(uintptr_t)(r->host + (page - r->first_page) * ps);
    uint64_t t0 = now_ns();
    uint64_t i = 0;
    while (i < n) {
        int zero = mig_page_is_zero(base + i * ps, ps);
        uint64_t j = i + 1;
        while (j < n && mig_page_is_zero(base + j * ps, ps) == zero) j++;
        uint8_t *h = t->headers + (size_t)t->nframes * MIG_FAST_HEADER_MAX;
        t->nframes++;
        uint64_t gpa = r->gpa + (page - r->first_page + i) * ps;
        size_t hl = mig_encode_page_header(h, zero, gpa, j - i, 0);
        t->iov[t->niov].iov_base = h;
        t->iov[t->niov].iov_len = hl;
        t->niov++;
        if (zero) {
            t->stats.zero_pages += j - i;
        } else {
            t->iov[t->niov].iov_base = (void *)(base + i * ps);
            t->iov[t->niov].iov_len = (size_t)((j - i) * ps);
            t->niov++;
            t->stats.payload_bytes += (j - i) * ps;
            t->stats.normal_pages += j - i;
        }
        t->stats.frames++;
        i = j;
    }
    t->stats.scan_ns += now_ns() - t0;
}

/* Writes the pending iovecs.  Returns 0 when all are out, or an event. */
static int tx_flush(struct mig_tx *t, int timeout_ms) {
    while (t->iov_pos < t->niov) {
        uint32_t cnt = t->niov - t->iov_pos;
        if (cnt > MIG_TX_IOV) cnt = MIG_TX_IOV;
        struct msghdr msg = {.msg_iov = t->iov + t->iov_pos, .msg_iovlen = cnt};
        uint64_t t0 = now_ns();
        ssize_t n = sendmsg(t->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        t->stats.send_ns += now_ns() - t0;
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) {
                t->err = errno;
                return MIG_TX_ERROR;
            }
            int w = wait_fd(t->fd, POLLOUT, t->wake_fd, timeout_ms, &t->stats.wait_ns);
            if (w < 0) {
                t->err = -w;
                return MIG_TX_ERROR;
            }
            if (w == 0) return MIG_TX_IDLE;
            if (__atomic_load_n(&t->interrupt, __ATOMIC_ACQUIRE)) {
                __atomic_store_n(&t->interrupt, 0, __ATOMIC_RELEASE);
                return MIG_TX_INTERRUPTED;
            }
            continue;
        }
        t->stats.wire_bytes += (uint64_t)n;
        size_t left = (size_t)n;
        while (left && t->iov_pos < t->niov) {
            struct iovec *v = &t->iov[t->iov_pos];
            if (left >= v->iov_len) {
                left -= v->iov_len;
                t->iov_pos++;
            } else {
                v->iov_base = (uint8_t *)v->iov_base + left;
                v->iov_len -= left;
                left = 0;
            }
        }
    }
    t->niov = t->iov_pos = t->nframes = 0;
    return 0;
}

/* Claims the next run of unsent pages (at most max_frame_pages, inside one region)
 * and builds its frames.  Returns 1 if frames were built, 0 if a claim found nothing
 * (call again), -1 when no unsent page is left. */
static int tx_claim(struct mig_tx *t) {
    const struct mig_pagemap *m = t->map;
    int64_t j = __atomic_exchange_n(&t->jump, -1, __ATOMIC_ACQ_REL);
    if (j >= 0 && (uint64_t)j < m->nbits) {
        t->cursor = j;
        t->wrapped = 0;
    }
    size_t len;
    int64_t i = mig_bitmap_find_run(m->bitmap, m->nbits, (size_t)t->cursor, 0, t->max_frame_pages, &len);
    if (i < 0) {
        if (t->wrapped || t->cursor == 0) return -1;
        t->cursor = 0;
        t->wrapped = 1;
        return 0;
    }
    const struct mig_region *r = region_of_page(m, (uint64_t)i);
    if (!r) return -1; /* bits past the regions: nothing to send there */
    uint64_t region_end = r->first_page + r->nbytes / r->page_size;
    if ((uint64_t)i + len > region_end) len = (size_t)(region_end - (uint64_t)i);
    uint32_t nruns = 0;
    uint64_t got = mig_bitmap_claim(m->bitmap, (uint64_t)i, len, t->claimed, &nruns);
    t->stats.claimed_pages += got;
    t->cursor = i + (int64_t)len;
    for (uint32_t k = 0; k < nruns; k++) tx_build(t, r, t->claimed[2 * k], t->claimed[2 * k + 1]);
    return nruns ? 1 : 0;
}

/* Pushes every page whose sent bit is clear, claiming each run before sending it,
 * until an event:
 *   MIG_TX_BATCH        batch_nbytes written since this call began (frames complete)
 *   MIG_TX_DONE         no unsent page is left (everything written)
 *   MIG_TX_IDLE         the socket had no room for timeout_ms, or a signal came
 *                       (state kept)
 *   MIG_TX_INTERRUPTED  interrupt was set (state kept)
 *   MIG_TX_ERROR        err holds the errno of sendmsg or poll */
int mig_tx_run(struct mig_tx *t, uint64_t batch_nbytes, int timeout_ms) {
    uint64_t start = t->stats.wire_bytes;
    t->err = 0;
    for (;;) {
        if (t->niov) {
            int ev = tx_flush(t, timeout_ms);
            if (ev) return ev;
            if (batch_nbytes && t->stats.wire_bytes - start >= batch_nbytes) return MIG_TX_BATCH;
        }
        if (__atomic_load_n(&t->interrupt, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&t->interrupt, 0, __ATOMIC_RELEASE);
            return MIG_TX_INTERRUPTED;
        }
        int c = tx_claim(t);
        if (c < 0) return MIG_TX_DONE;
    }
}
