/* What the shared Cortex-M startup (startup.c) needs from each board. */
#ifndef TINYTRAIN_BOARD_H
#define TINYTRAIN_BOARD_H

/* Exit code of a fault (HardFault, MemManage, BusFault, UsageFault or an unexpected exception). */
#define BOARD_FAULT_EXIT 3

/* Brings up the board's I/O (after .data/.bss and the FPU) and returns main's argument count and vector. */
int board_start(char ***argv);

/* Ends the program with main's return code or BOARD_FAULT_EXIT. */
void board_exit(int code) __attribute__((noreturn));

#endif
