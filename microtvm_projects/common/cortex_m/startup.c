/* Reset, vector table, fault reports, stack painting and the heap, shared by every Cortex-M board. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "board.h"
#include "platform.h"

int main(int argc, char **argv);

/* From cortex_m.ld. */
extern uint32_t __data_start[], __data_end[], __data_load[], __bss_start[], __bss_end[], __stack_start[], __stack_end[];
extern char __heap_start[], __heap_end[];

#define REG(addr) (*(volatile uint32_t *)(addr))
#define SCB_CPACR REG(0xE000ED88)
#define SCB_SHCSR REG(0xE000ED24)
#define SCB_CFSR REG(0xE000ED28)
#define SCB_HFSR REG(0xE000ED2C)
#define SCB_MMFAR REG(0xE000ED34)
#define SCB_BFAR REG(0xE000ED38)

#define STACK_PAINT 0xA5A5A5A5u

void reset_handler(void) __attribute__((noreturn));
void fault_handler(void);
/* A board that uses SysTick (QEMU counts instructions with it) defines its own handler. */
void systick_handler(void) __attribute__((weak, alias("fault_handler")));

/* Every exception but reset is unexpected except SysTick on boards that define it: all of them report and exit. */
__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    [0] = (void (*)(void))__stack_end, /* initial stack pointer */
    [1] = reset_handler,
    [2] = fault_handler,  /* NMI */
    [3] = fault_handler,  /* HardFault */
    [4] = fault_handler,  /* MemManage */
    [5] = fault_handler,  /* BusFault */
    [6] = fault_handler,  /* UsageFault */
    [11] = fault_handler, /* SVCall */
    [12] = fault_handler, /* DebugMonitor */
    [14] = fault_handler, /* PendSV */
    [15] = systick_handler,
};

void reset_handler(void) {
#ifdef __ARM_FP /* hard-float code: CP10/CP11 must be on before the first float instruction */
    SCB_CPACR |= 0xFu << 20;
    __asm volatile("dsb\n isb" ::: "memory");
#endif
    memcpy(__data_start, __data_load, (size_t)((char *)__data_end - (char *)__data_start));
    memset(__bss_start, 0, (size_t)((char *)__bss_end - (char *)__bss_start));
    /* Own handlers for MemManage, BusFault and UsageFault, so that the report names the fault instead of HardFault. */
    SCB_SHCSR |= 7u << 16;
    /* Paint the stack below this frame (a margin for the calls that paint); platform_stack_peak finds the high-water mark. */
    uint32_t *sp;
    __asm volatile("mov %0, sp" : "=r"(sp));
    for (volatile uint32_t *p = __stack_start; p < sp - 16; p++) *p = STACK_PAINT;
    char **argv;
    int argc = board_start(&argv);
    board_exit(main(argc, argv));
}

uint32_t platform_stack_peak(void) {
    const uint32_t *p = __stack_start;
    while (p < __stack_end && *p == STACK_PAINT) p++;
    return (uint32_t)((const char *)__stack_end - (const char *)p);
}

static const char *exception_name(uint32_t number) {
    static const char *const names[] = {"thread", "reset", "NMI", "HardFault", "MemManage", "BusFault", "UsageFault", "", "", "", "",
                                        "SVCall",  "DebugMonitor", "", "PendSV", "SysTick"};
    return number < sizeof names / sizeof names[0] ? names[number] : "IRQ";
}

/* frame: the registers the exception pushed (r0-r3, r12, lr, pc, xpsr). */
void fault_report(const uint32_t *frame) __attribute__((noreturn, used));
void fault_report(const uint32_t *frame) {
    uint32_t ipsr;
    __asm volatile("mrs %0, ipsr" : "=r"(ipsr));
    ipsr &= 0x1FF;
    fprintf(stderr, "\nfault: %s (exception %lu) at pc=0x%08lx lr=0x%08lx CFSR=0x%08lx HFSR=0x%08lx MMFAR=0x%08lx BFAR=0x%08lx\n",
            exception_name(ipsr), (unsigned long)ipsr, (unsigned long)frame[6], (unsigned long)frame[5], (unsigned long)SCB_CFSR,
            (unsigned long)SCB_HFSR, (unsigned long)SCB_MMFAR, (unsigned long)SCB_BFAR);
    board_exit(BOARD_FAULT_EXIT);
}

/* Finds the stacked frame (main or process stack) and reports it. */
__attribute__((naked)) void fault_handler(void) {
    __asm volatile("tst lr, #4\n"
                   "ite eq\n"
                   "mrseq r0, msp\n"
                   "mrsne r0, psp\n"
                   "b fault_report\n");
}

/* malloc (newlib stdio and float printing) takes its memory from the linker's .heap reserve, never past it. */
static char *heap_break = __heap_start;
static uint32_t heap_peak;

void *_sbrk(ptrdiff_t increment) {
    if (increment > __heap_end - heap_break || increment < __heap_start - heap_break) {
        errno = ENOMEM;
        return (void *)-1;
    }
    char *previous = heap_break;
    heap_break += increment;
    if ((uint32_t)(heap_break - __heap_start) > heap_peak) heap_peak = (uint32_t)(heap_break - __heap_start);
    return previous;
}

uint32_t platform_heap_peak(void) { return heap_peak; }
