/* QEMU mps2 boards: argv and files through semihosting, instructions counted with SysTick under -icount. */
#include <stdio.h>
#include <stdlib.h>

#include "board.h"
#include "platform.h"

void initialise_monitor_handles(void);

#define REG(addr) (*(volatile uint32_t *)(addr))
#define SYST_CSR REG(0xE000E010)
#define SYST_RVR REG(0xE000E014)
#define SYST_CVR REG(0xE000E018)
#define SYST_RELOAD 0xFFFFFFu /* 24 bits; the interrupt counts the wraps */
/* Under -icount shift=0 every guest instruction takes 1 ns of virtual time, and SysTick ticks with the 25 MHz mps2
 * SYSCLK, so one tick is 40 instructions (measured: a 6-instruction loop run 20M times advances it 3,000,000 ticks).
 * DWT->CYCCNT would be finer, but it reads 0 under QEMU 7.2. */
#define INSTRUCTIONS_PER_TICK 40u

#define SEMIHOSTING_GET_CMDLINE 0x15
#define MAX_ARGS 8

static volatile uint32_t systick_wraps;

void systick_handler(void) { systick_wraps++; }

const char *const platform_counter_name = "instructions";

void platform_init(void) {
    SYST_RVR = SYST_RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7; /* processor clock, interrupt, enable */
    /* The current value reads 0 until the first tick loads the reload value. */
    while (SYST_CVR == 0) {
    }
}

uint64_t platform_counter(void) {
    uint32_t wraps, value;
    do { /* re-read when the wrap interrupt came in between */
        wraps = systick_wraps;
        value = SYST_CVR;
    } while (wraps != systick_wraps);
    return ((uint64_t)wraps * (SYST_RELOAD + 1u) + (SYST_RELOAD - value)) * INSTRUCTIONS_PER_TICK;
}

static int semihosting_call(int operation, void *argument) {
    register int r0 __asm("r0") = operation;
    register void *r1 __asm("r1") = argument;
    __asm volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

/* The command line QEMU got (-semihosting-config arg=...), split at spaces: the driver passes no argument containing one. */
int board_start(char ***argv) {
    static char line[1024];
    static char *args[MAX_ARGS];
    struct {
        char *buffer;
        int length;
    } request = {line, sizeof line - 1};
    initialise_monitor_handles(); /* without it stdio goes nowhere */
    if (semihosting_call(SEMIHOSTING_GET_CMDLINE, &request) != 0) {
        fprintf(stderr, "tinytrain: no semihosting command line\n");
        exit(2);
    }
    int argc = 0;
    for (char *p = line; *p != '\0' && argc < MAX_ARGS;) {
        while (*p == ' ') *p++ = '\0';
        if (*p != '\0') args[argc++] = p;
        while (*p != '\0' && *p != ' ') p++;
    }
    *argv = args;
    return argc;
}

/* exit flushes stdio and leaves QEMU through semihosting with this code. */
void board_exit(int code) { exit(code); }
