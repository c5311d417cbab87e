/* Freestanding helpers shared by the built-in guests.  See docs/boot-abi.md. */
#ifndef MIGRATED_GUEST_H
#define MIGRATED_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define PAGE_SIZE 4096UL

/* Ports of the boot ABI. */
#define PORT_CONSOLE 0x3F8
#define PORT_STATUS 0x510
#define PORT_COMMAND 0x511
#define PORT_CLOCK_US 0x512
#define PORT_SLEEP_US 0x513

/* Status codes written to PORT_STATUS (code in EAX, arguments in RBX, RCX, RSI, RDI). */
#define STATUS_READY 1
#define STATUS_VERIFY_OK 2
#define STATUS_VERIFY_FAIL 3
#define STATUS_PROGRESS 4
#define STATUS_HALT 5

/* Commands read from PORT_COMMAND. */
#define COMMAND_NONE 0
#define COMMAND_VERIFY 1
#define COMMAND_STOP 2

static inline void outb(u16 port, u8 value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outl(u16 port, u32 value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline u32 inl(u16 port)
{
	u32 value;
	__asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port) : "memory");
	return value;
}

/* One status report: a single OUT whose arguments the VMM reads from the registers. */
static inline void report(u32 code, u64 a, u64 b, u64 c, u64 d)
{
	__asm__ volatile("outl %%eax, %%dx"
			 :
			 : "a"(code), "d"(PORT_STATUS), "b"(a), "c"(b), "S"(c), "D"(d)
			 : "memory");
}

/* Ends this vCPU.  HLT is privileged, so at CPL3 the STATUS_HALT report is what ends the
 * vCPU; the HLT is for guests run at CPL0 (and is never reached at CPL3). */
static inline __attribute__((noreturn)) void halt(u64 code)
{
	report(STATUS_HALT, code, 0, 0, 0);
	for (;;)
		__asm__ volatile("hlt");
}

static inline void console_putc(char c)
{
	outb(PORT_CONSOLE, (u8)c);
}

static inline void console_puts(const char *s)
{
	while (*s)
		console_putc(*s++);
}

static inline void console_putu(u64 v)
{
	char buf[21];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		console_putc(buf[--n]);
}

#endif
