/* Declarations shared by the cffi cdef and the compiler: plain C, no preprocessor
 * lines (cffi parses this text too).  The loop contexts (struct mig_rx, mig_tx) are
 * defined in pagestream.c; the cdef shows Python only some of their fields. */

/* One guest memory region as both page loops see it. */
struct mig_region {
    uint64_t gpa;
    uint64_t nbytes;
    uint64_t page_size;
    uint64_t host;        /* host virtual address of the region's first byte */
    uint64_t first_page;  /* global page index (layout order) of its first page */
};

/* The page map of one side: regions, the shared page bitmap, and on a destination
 * the userfaultfd that installs pages (-1: write guest memory directly). */
struct mig_pagemap {
    const struct mig_region *regions;
    uint32_t nregions;
    int uffd;
    uint8_t *bitmap;
    uint64_t nbits;
    const uint8_t *zero_src;   /* zeroes of the largest page size, for hugetlb */
};

struct mig_install_result {
    uint64_t installed_pages;  /* bits this call set (pages it put in place) */
    uint64_t skipped_pages;    /* bit already set: not touched */
    uint64_t present_pages;    /* EEXIST: put in place by someone else, woken */
    uint64_t install_ns;       /* inside UFFDIO_COPY / UFFDIO_ZEROPAGE / memcpy */
    uint32_t nruns;            /* (first_page, npages) pairs appended to runs */
};

struct mig_rx_stats {
    uint64_t bytes;            /* consumed from the socket by the C loop */
    uint64_t frames;           /* frames the C loop handled */
    uint64_t normal_pages;     /* pages carried by Pages frames it handled */
    uint64_t zero_pages;       /* pages carried by ZeroPages frames it handled */
    uint64_t installed_pages;
    uint64_t skipped_pages;
    uint64_t present_pages;
    uint64_t install_ns;
    uint64_t wait_ns;          /* inside poll() waiting for data */
    uint64_t handbacks;        /* frames handed back to Python */
};

struct mig_tx_stats {
    uint64_t wire_bytes;       /* headers and payloads written to the socket */
    uint64_t payload_bytes;
    uint64_t frames;
    uint64_t normal_pages;
    uint64_t zero_pages;
    uint64_t claimed_pages;
    uint64_t scan_ns;          /* zero-page scans */
    uint64_t send_ns;          /* inside sendmsg() */
    uint64_t wait_ns;          /* inside poll() waiting for room */
};
