/* The destination's receive-and-install loop (see the facts in pagestream.c). */

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

