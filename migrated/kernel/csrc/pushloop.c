/* The source's push loop (see the facts in pagestream.c). */

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
