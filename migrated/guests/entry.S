/* Entry stub of the built-in guests (see docs/boot-abi.md).
 *
 * On entry: RDI = guest RAM bytes, RSI = vCPU index, RDX = vCPU count,
 * R8 = GPA of the boot-parameter page, RSP = top of this vCPU's stack (16-byte aligned).
 * guest_main(ram_bytes, vcpu_index, vcpu_count, params) must not return; if it does,
 * the vCPU reports STATUS_HALT.
 */
	.section .text.entry, "ax"
	.globl _start
_start:
	mov %r8, %rcx
	and $-16, %rsp
	call guest_main
	mov $5, %eax		/* STATUS_HALT */
	xor %ebx, %ebx
	mov $0x510, %dx
	outl %eax, %dx
1:	hlt
	jmp 1b

	.section .note.GNU-stack, "", @progbits
