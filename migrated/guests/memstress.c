/*
 * memstress: the proof that no guest page is lost or stale across a migration.
 *
 * Each vCPU owns one slice of [end of image, end of RAM).  The slice starts with a table
 * of u32 page generations (one per data page of the slice) followed by the data pages.
 * A data page with generation 0 is all zero; with generation g >= 1 its qword i is
 * expected(gpa, g, i) below.  The guest fills the slice (generation 1 on the pages picked
 * by fill_percent), reports READY, then rewrites random pages of its hot set (the first
 * hot_set_pages data pages), bumping their generation, and verifies the whole slice on
 * command and every verify_every_writes writes.
 *
 * Boot parameters (u64 each, in the boot-parameter page):
 *   [0] hot_set_pages (per vCPU)  [1] writes_per_s (0 = unlimited)
 *   [2] verify_every_writes (0 = on command only)  [3] fill_percent  [4] seed
 */
#include "guest.h"

extern char _end[];

enum { P_HOT_SET_PAGES, P_WRITES_PER_S, P_VERIFY_EVERY, P_FILL_PERCENT, P_SEED };

#define QWORDS_PER_PAGE (PAGE_SIZE / 8)
#define K1 0x9E3779B97F4A7C15UL
#define K2 0xC2B2AE3D27D4EB4FUL
#define K3 0x165667B19E3779F9UL

/* Writes between two command polls when not paced; ~16 MiB of stores, a few ms. */
#define UNPACED_CHUNK 4096
/* Longest single sleep, so commands (verify, stop) are seen within ~0.1 s. */
#define MAX_SLEEP_US 100000
#define PROGRESS_EVERY_US 1000000

struct ctx {
	u64 data_gpa;    /* first data page */
	u64 data_pages;  /* data pages in this slice */
	u32 *gen;        /* generation table, data_pages entries */
	u64 hot_pages;
	u64 writes_per_s;
	u64 verify_every;
	u64 rng;
	u64 writes;
	u64 verify_pass;
};

static inline u64 page_base(u64 gpa, u32 gen)
{
	return (gpa * K1) ^ ((u64)gen * K2);
}

static inline u64 mix64(u64 x)
{
	x ^= x >> 33;
	x *= 0xFF51AFD7ED558CCDUL;
	x ^= x >> 33;
	x *= 0xC4CEB9FE1A85EC53UL;
	x ^= x >> 33;
	return x;
}

static inline u64 xorshift64(u64 *state)
{
	u64 x = *state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

static void write_page(u64 gpa, u32 gen)
{
	u64 *q = (u64 *)gpa;
	u64 base = page_base(gpa, gen);
	for (u64 i = 0; i < QWORDS_PER_PAGE; i++)
		q[i] = base + i * K3;
}

/* Verifies every data page; reports VERIFY_OK or the first VERIFY_FAIL. */
static void verify(struct ctx *c)
{
	c->verify_pass++;
	for (u64 p = 0; p < c->data_pages; p++) {
		u64 gpa = c->data_gpa + p * PAGE_SIZE;
		const u64 *q = (const u64 *)gpa;
		u32 g = c->gen[p];
		u64 base = g ? page_base(gpa, g) : 0;
		u64 step = g ? K3 : 0;
		for (u64 i = 0; i < QWORDS_PER_PAGE; i++) {
			u64 expected = base + i * step;
			if (q[i] != expected) {
				report(STATUS_VERIFY_FAIL, gpa + i * 8, expected, q[i], g);
				return;
			}
		}
	}
	report(STATUS_VERIFY_OK, c->data_pages, c->verify_pass, 0, 0);
}

static u64 fill(struct ctx *c, u64 fill_percent, u64 seed, u32 *pending)
{
	u64 filled = 0;
	for (u64 p = 0; p < c->data_pages; p++) {
		u64 gpa = c->data_gpa + p * PAGE_SIZE;
		if (fill_percent < 100 && mix64((gpa >> 12) ^ seed) % 100 >= fill_percent)
			continue;
		c->gen[p] = 1;
		write_page(gpa, 1);
		filled++;
		if ((filled & 4095) == 0) {
			u32 cmd = inl(PORT_COMMAND);
			if (cmd == COMMAND_STOP)
				halt(0);
			if (cmd != COMMAND_NONE)
				*pending = cmd;
		}
	}
	return filled;
}

static void do_command(struct ctx *c, u32 cmd)
{
	if (cmd == COMMAND_VERIFY)
		verify(c);
	else if (cmd == COMMAND_STOP)
		halt(c->writes);
}

void guest_main(u64 ram_bytes, u64 vcpu_index, u64 vcpu_count, const u64 *params)
{
	struct ctx c = { 0 };
	u64 seed = params[P_SEED];
	u64 fill_percent = params[P_FILL_PERCENT];
	if (fill_percent > 100)
		fill_percent = 100;
	c.writes_per_s = params[P_WRITES_PER_S];
	c.verify_every = params[P_VERIFY_EVERY];

	/* Slice of this vCPU, in pages. */
	u64 start_page = ((u64)_end + PAGE_SIZE - 1) / PAGE_SIZE;
	u64 end_page = ram_bytes / PAGE_SIZE;
	u64 total = end_page > start_page ? end_page - start_page : 0;
	u64 first = start_page + total * vcpu_index / vcpu_count;
	u64 last = start_page + total * (vcpu_index + 1) / vcpu_count;
	u64 slice = last - first;
	/* T table pages hold 1024 entries each and must cover slice - T data pages. */
	u64 table_pages = (slice + 1024) / 1025;
	c.gen = (u32 *)(first * PAGE_SIZE);
	c.data_gpa = (first + table_pages) * PAGE_SIZE;
	c.data_pages = slice - table_pages;
	c.hot_pages = params[P_HOT_SET_PAGES];
	if (c.hot_pages > c.data_pages)
		c.hot_pages = c.data_pages;
	c.rng = mix64(seed ^ ((vcpu_index + 1) * K1)) | 1;

	if (vcpu_index == 0) {
		console_puts("memstress: ");
		console_putu(vcpu_count);
		console_puts(" vcpu(s), ");
		console_putu(ram_bytes >> 20);
		console_puts(" MiB RAM, image ends at page ");
		console_putu(start_page);
		console_puts("\n");
	}

	u32 pending = COMMAND_NONE;
	u64 filled = fill(&c, fill_percent, seed, &pending);
	report(STATUS_READY, filled, c.data_pages, c.hot_pages, 0);
	if (pending != COMMAND_NONE)
		do_command(&c, pending);

	u64 chunk = UNPACED_CHUNK;
	if (c.writes_per_s) {
		chunk = c.writes_per_s / 100;
		if (chunk < 1)
			chunk = 1;
		if (chunk > UNPACED_CHUNK)
			chunk = UNPACED_CHUNK;
	}
	u32 pace_base_us = inl(PORT_CLOCK_US);
	u64 pace_base_writes = 0;
	u32 last_progress_us = pace_base_us;
	u64 since_verify = 0;

	for (;;) {
		u64 n = chunk;
		if (c.verify_every && c.verify_every - since_verify < n)
			n = c.verify_every - since_verify;
		if (c.hot_pages == 0)
			n = 0;
		for (u64 k = 0; k < n; k++) {
			u64 p = xorshift64(&c.rng) % c.hot_pages;
			u32 g = c.gen[p] + 1;
			if (g == 0)
				g = 1;
			c.gen[p] = g;
			write_page(c.data_gpa + p * PAGE_SIZE, g);
		}
		c.writes += n;
		since_verify += n;
		if (c.verify_every && since_verify >= c.verify_every) {
			verify(&c);
			since_verify = 0;
		}

		u32 cmd = inl(PORT_COMMAND);
		if (cmd != COMMAND_NONE)
			do_command(&c, cmd);

		u32 now_us = inl(PORT_CLOCK_US);
		if ((u32)(now_us - last_progress_us) >= PROGRESS_EVERY_US) {
			report(STATUS_PROGRESS, c.writes, 0, 0, 0);
			last_progress_us = now_us;
		}
		if (c.hot_pages == 0) {
			outl(PORT_SLEEP_US, MAX_SLEEP_US);
			continue;
		}
		if (c.writes_per_s == 0)
			continue;

		/*
		 * Pacing.  The clock is the VMM's low 32 bits of microseconds: it wraps, and
		 * after a migration it may jump backwards or forwards.  An elapsed time that
		 * looks negative (>= 2^31) or far behind schedule resets the base instead of
		 * sleeping for ages or bursting to catch up.
		 */
		u32 elapsed_us = now_us - pace_base_us;
		u64 due_us = (c.writes - pace_base_writes) * 1000000UL / c.writes_per_s;
		if (elapsed_us >= 0x80000000u || elapsed_us > due_us + 1000000UL ||
		    due_us > 0x40000000UL) {
			pace_base_us = now_us;
			pace_base_writes = c.writes;
		} else if (due_us > elapsed_us) {
			u64 sleep_us = due_us - elapsed_us;
			if (sleep_us > MAX_SLEEP_US)
				sleep_us = MAX_SLEEP_US;
			outl(PORT_SLEEP_US, (u32)sleep_us);
		}
	}
}
