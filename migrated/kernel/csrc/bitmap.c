/* Page bitmaps: one bit per page, LSB first within each byte.
 *
 * Facts we rely on (the concurrency contract of every bitmap helper here):
 *
 * A bitmap may be shared by threads that run at the same time without a common lock:
 * the C page loops (GIL released) and Python code on other threads (the event loop
 * installing urgent pages, the urgent path marking pages sent).  So every mutator
 * here changes a byte only with an atomic read-modify-write (__atomic_fetch_or /
 * __atomic_fetch_and), or stores whole bytes/words atomically, and never with a plain
 * load-modify-store that could undo another thread's change to a neighbouring bit.
 * Readers use relaxed atomic loads: a reader sees each byte either before or after a
 * concurrent change, never torn.  On x86-64 (the only target) byte and aligned
 * 8-byte accesses are single-copy atomic and lock-prefixed operations of different
 * sizes on the same memory are coherent, so mixing byte and word atomics is safe.
 *
 * A compound decision (find a clear run, then set it) is not atomic as a whole;
 * mig_bitmap_claim makes it exact instead: it sets bits with fetch_or and reports
 * which of them *this* call changed from 0 to 1.  Two threads claiming overlapping
 * ranges therefore never both own a page.
 */

static inline uint8_t bm_load8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline uint64_t bm_load64(const uint8_t *p) {
    if (((uintptr_t)p & 7) == 0) return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
    uint64_t w = 0;
    for (int k = 0; k < 8; k++) w |= (uint64_t)bm_load8(p + k) << (8 * k);
    return w;
}

static inline void bm_or8(uint8_t *p, uint8_t mask) { __atomic_fetch_or(p, mask, __ATOMIC_ACQ_REL); }
static inline void bm_and8(uint8_t *p, uint8_t mask) {
    __atomic_fetch_and(p, mask, __ATOMIC_ACQ_REL);
}

static inline int bit_at(const uint8_t *bm, size_t i) { return (bm_load8(bm + (i >> 3)) >> (i & 7)) & 1; }

/* Sets bit (first_bit + i) of bitmap_out for every all-zero page i; returns the count.
 * Bits of non-zero pages are left as they were. */
size_t mig_find_zero_pages(const uint8_t *base, size_t npages, size_t page_size,
                           uint8_t *bitmap_out, size_t first_bit) {
    size_t count = 0;
    for (size_t i = 0; i < npages; i++) {
        if (mig_page_is_zero(base + i * page_size, page_size)) {
            size_t b = first_bit + i;
            bm_or8(bitmap_out + (b >> 3), (uint8_t)(1u << (b & 7)));
            count++;
        }
    }
    return count;
}

/* Finds the first bit equal to value at or after start; *run_len receives the length
 * of the run of equal bits from there (at most max_len; 0: unbounded).  Returns its
 * index or -1. */
int64_t mig_bitmap_find_run(const uint8_t *bm, size_t nbits, size_t start, int value,
                            size_t max_len, size_t *run_len) {
    const uint8_t skip = value ? 0x00 : 0xFF;
    const uint64_t skip64 = value ? 0ULL : ~0ULL;
    size_t i = start;
    while (i < nbits) {
        if ((i & 63) == 0 && i + 64 <= nbits && bm_load64(bm + (i >> 3)) == skip64) {
            i += 64;
            continue;
        }
        if ((i & 7) == 0 && i + 8 <= nbits && bm_load8(bm + (i >> 3)) == skip) {
            i += 8;
            continue;
        }
        if (bit_at(bm, i) == value) break;
        i++;
    }
    if (i >= nbits) {
        *run_len = 0;
        return -1;
    }
    size_t j = i;
    const uint8_t full = value ? 0xFF : 0x00;
    const uint64_t full64 = value ? ~0ULL : 0ULL;
    size_t limit = max_len ? (i + max_len < nbits ? i + max_len : nbits) : nbits;
    while (j < limit) {
        if ((j & 63) == 0 && j + 64 <= limit && bm_load64(bm + (j >> 3)) == full64) {
            j += 64;
            continue;
        }
        if ((j & 7) == 0 && j + 8 <= limit && bm_load8(bm + (j >> 3)) == full) {
            j += 8;
            continue;
        }
        if (bit_at(bm, j) != value) break;
        j++;
    }
    *run_len = j - i;
    return (int64_t)i;
}

size_t mig_bitmap_count(const uint8_t *bm, size_t nbits) {
    size_t count = 0, i = 0, nbytes = nbits >> 3;
    for (; i + 8 <= nbytes; i += 8) count += (size_t)__builtin_popcountll(bm_load64(bm + i));
    for (; i < nbytes; i++) count += (size_t)__builtin_popcount(bm_load8(bm + i));
    for (size_t b = nbytes << 3; b < nbits; b++) count += bit_at(bm, b);
    return count;
}

/* Mask of bits [lo, hi) of one byte, 0 <= lo < hi <= 8. */
static inline uint8_t byte_mask(unsigned lo, unsigned hi) {
    return (uint8_t)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

void mig_bitmap_set_range(uint8_t *bm, size_t start, size_t n, int value) {
    size_t i = start, end = start + n;
    while (i < end) {
        size_t byte = i >> 3;
        unsigned lo = (unsigned)(i & 7);
        unsigned hi = end - (byte << 3) >= 8 ? 8 : (unsigned)(end - (byte << 3));
        if (lo == 0 && hi == 8) {
            /* Whole bytes: atomic stores (word-sized where aligned).  A concurrent
             * change to these bits is ordered before or after ours, never lost in
             * the middle of a read-modify-write. */
            size_t nbytes = (end - i) >> 3;
            uint8_t *p = bm + byte;
            uint8_t v8 = value ? 0xFF : 0x00;
            size_t k = 0;
            for (; k < nbytes && ((uintptr_t)(p + k) & 7); k++)
                __atomic_store_n(p + k, v8, __ATOMIC_RELEASE);
            for (; k + 8 <= nbytes; k += 8)
                __atomic_store_n((uint64_t *)(p + k), value ? ~0ULL : 0ULL, __ATOMIC_RELEASE);
            for (; k < nbytes; k++) __atomic_store_n(p + k, v8, __ATOMIC_RELEASE);
            i += nbytes << 3;
            continue;
        }
        uint8_t mask = byte_mask(lo, hi);
        if (value)
            bm_or8(bm + byte, mask);
        else
            bm_and8(bm + byte, (uint8_t)~mask);
        i = (byte << 3) + hi;
    }
}

/* dst |= src; returns how many bits became set that were clear before. */
size_t mig_bitmap_or_count_new(uint8_t *dst, const uint8_t *src, size_t nbytes) {
    size_t count = 0;
    for (size_t i = 0; i < nbytes; i++) {
        uint8_t s = bm_load8(src + i);
        if (!s) continue;
        uint8_t old = __atomic_fetch_or(dst + i, s, __ATOMIC_ACQ_REL);
        count += (size_t)__builtin_popcount(s & (uint8_t)~old);
    }
    return count;
}

/* dst &= ~src */
void mig_bitmap_andnot(uint8_t *dst, const uint8_t *src, size_t nbytes) {
    for (size_t i = 0; i < nbytes; i++) {
        uint8_t s = bm_load8(src + i);
        if (s) bm_and8(dst + i, (uint8_t)~s);
    }
}

/* Appends run [first, first+n) to runs (pairs), merging with the last one when they
 * touch.  The caller guarantees room for one more pair. */
static inline void runs_append(uint64_t *runs, uint32_t *nruns, uint64_t first, uint64_t n) {
    uint32_t k = *nruns;
    if (k && runs[2 * (k - 1)] + runs[2 * (k - 1) + 1] == first) {
        runs[2 * (k - 1) + 1] += n;
        return;
    }
    runs[2 * k] = first;
    runs[2 * k + 1] = n;
    *nruns = k + 1;
}

/* Atomically sets bits [start, start+n) and appends to runs the sub-runs whose bits
 * this call changed from 0 to 1 (merged with a touching last run).  runs must have
 * room for (n + 1) / 2 + 1 more pairs.  Returns the number of bits this call set. */
uint64_t mig_bitmap_claim(uint8_t *bm, uint64_t start, uint64_t n, uint64_t *runs,
                          uint32_t *nruns) {
    uint64_t end = start + n, i = start, count = 0;
    int64_t open = -1; /* first page of the run being built */
    while (i < end) {
        uint64_t byte = i >> 3;
        unsigned lo = (unsigned)(i & 7);
        unsigned hi = end - (byte << 3) >= 8 ? 8 : (unsigned)(end - (byte << 3));
        uint8_t mask = byte_mask(lo, hi);
        uint8_t old = __atomic_fetch_or(bm + byte, mask, __ATOMIC_ACQ_REL);
        uint8_t got = mask & (uint8_t)~old;
        uint64_t base = byte << 3;
        if (got == mask) {
            if (open < 0) open = (int64_t)(base + lo);
            count += hi - lo;
        } else if (got == 0) {
            if (open >= 0) {
                runs_append(runs, nruns, (uint64_t)open, base + lo - (uint64_t)open);
                open = -1;
            }
        } else {
            for (unsigned b = lo; b < hi; b++) {
                if (got >> b & 1) {
                    count++;
                    if (open < 0) open = (int64_t)(base + b);
                } else if (open >= 0) {
                    runs_append(runs, nruns, (uint64_t)open, base + b - (uint64_t)open);
                    open = -1;
                }
            }
        }
        i = base + hi;
    }
    if (open >= 0) runs_append(runs, nruns, (uint64_t)open, end - (uint64_t)open);
    return count;
}

/* MADV_DONTNEED of iov[0..n): one process_madvise(2) call on ourselves where the
 * kernel takes it (6.13+ accepts any advice for the calling process; 6.15+ then
 * flushes the TLB once per call instead of once per range), else one madvise per
 * range.  Measured here with 2500 scattered pages of a 512 MiB mapping: 6.5 ms as
 * madvise calls, 3 ms batched; with a second thread of the process running, 40 ms
 * against 2-3 ms (each madvise's TLB shootdown interrupts that CPU).  Returns 0 or
 * -errno.  *pidfd: -2 untried, -1 unavailable (madvise from then on), else ours. */
#define MIG_DISCARD_BATCH 1024 /* UIO_MAXIOV */
static int discard_ranges(struct iovec *iov, int n, int *pidfd) {
#ifdef SYS_process_madvise
    if (*pidfd == -2) {
        long fd = syscall(SYS_pidfd_open, getpid(), 0);
        *pidfd = fd < 0 ? -1 : (int)fd;
    }
    if (*pidfd >= 0) {
        size_t want = 0;
        for (int k = 0; k < n; k++) want += iov[k].iov_len;
        long got = syscall(SYS_process_madvise, *pidfd, iov, (size_t)n, MADV_DONTNEED, 0);
        if (got >= 0 && (size_t)got == want) return 0;
        if (got < 0 && errno != EINVAL && errno != EPERM && errno != ENOSYS && errno != EBADF)
            return -errno;
        if (got < 0) { /* this kernel refuses it for DONTNEED: never ask again */
            close(*pidfd);
            *pidfd = -1;
        }
        /* partial or refused: madvise every range (dropping twice is harmless) */
    }
#else
    (void)pidfd;
#endif
    for (int k = 0; k < n; k++)
        if (madvise(iov[k].iov_base, iov[k].iov_len, MADV_DONTNEED) < 0) return -errno;
    return 0;
}

/* MADV_DONTNEED every run of set bits among bits [first_bit, first_bit + npages) of
 * bitmap; bit first_bit + i stands for the page at base + i * page_size.  Runs go to
 * the kernel in batches (discard_ranges).  Returns the number of pages dropped, or
 * -errno of the first call that failed. */
int64_t mig_discard_bitmap(uint8_t *base, size_t npages, size_t page_size,
                           const uint8_t *bitmap, size_t first_bit) {
    size_t end = first_bit + npages, pos = first_bit, len;
    int64_t dropped = 0;
    struct iovec iov[MIG_DISCARD_BATCH];
    int n = 0, pidfd = -2, rc = 0;
    while (pos < end) {
        int64_t i = mig_bitmap_find_run(bitmap, end, pos, 1, 0, &len);
        if (i < 0) break;
        iov[n].iov_base = base + ((size_t)i - first_bit) * page_size;
        iov[n].iov_len = len * page_size;
        if (++n == MIG_DISCARD_BATCH) {
            if ((rc = discard_ranges(iov, n, &pidfd)) < 0) break;
            n = 0;
        }
        dropped += (int64_t)len;
        pos = (size_t)i + len;
    }
    if (rc == 0 && n > 0) rc = discard_ranges(iov, n, &pidfd);
    if (pidfd >= 0) close(pidfd);
    return rc < 0 ? rc : dropped;
}
