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
 *
 * Files: this one (shared definitions, page map lookups, installing, waiting, the
 * msgpack extent), recvloop.c (the receive loop), pushloop.c (the push loop).
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

/* ---- msgpack: the extent of any one object (the Python fallback's need) ---- */

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

