/* STM32F746 (Cortex-M7): the dataset and arguments compiled into flash (dataset.c, written by generate_project), output
 * files and messages on USART1 (TX PA9, RX PA10, 115200 8N1), cycles from the DWT counter. Register level, no HAL.
 * The core runs from the 16 MHz HSI oscillator it starts on (no PLL, caches off): cycle counts do not depend on it.
 *
 * Serial protocol (read_serial_capture in project.py decodes it): messages as text; each output file as a line
 * "#file NAME", its bytes as hex lines, a line "#end NAME"; at the end a line "#exit CODE". */
#include <stdio.h>

#include "board.h"
#include "platform.h"

extern const uint8_t tinytrain_dataset[];
extern const uint32_t tinytrain_dataset_bytes;
extern const char *const tinytrain_argv[];
extern const int tinytrain_argc;

#define REG(addr) (*(volatile uint32_t *)(addr))
#define RCC_AHB1ENR REG(0x40023830)
#define RCC_APB2ENR REG(0x40023844)
#define GPIOA_MODER REG(0x40020000)
#define GPIOA_AFRH REG(0x40020024)
#define USART1_CR1 REG(0x40011000)
#define USART1_BRR REG(0x4001100C)
#define USART1_ISR REG(0x4001101C)
#define USART1_TDR REG(0x40011028)
#define USART_ISR_TC (1u << 6)
#define USART_ISR_TXE (1u << 7)
#define DEMCR REG(0xE000EDFC)
#define DWT_CTRL REG(0xE0001000)
#define DWT_CYCCNT REG(0xE0001004)
#define DWT_LAR REG(0xE0001FB0)

#define PCLK2_HZ 16000000u /* HSI, APB2 prescaler 1 after reset */
#define BAUD 115200u
#define HEX_BYTES_PER_LINE 32u

static void usart_put(char c) {
    while (!(USART1_ISR & USART_ISR_TXE)) {
    }
    USART1_TDR = (uint8_t)c;
}

static void usart_puts(const char *s) {
    while (*s) usart_put(*s++);
}

/* stdout and stderr of newlib (nosys.specs leaves _write to the board); "\r\n" for terminals. */
int _write(int fd, const char *buffer, int length) {
    (void)fd;
    for (int i = 0; i < length; i++) {
        if (buffer[i] == '\n') usart_put('\r');
        usart_put(buffer[i]);
    }
    return length;
}

int board_start(char ***argv) {
    RCC_AHB1ENR |= 1u << 0; /* GPIOA */
    RCC_APB2ENR |= 1u << 4; /* USART1 */
    (void)RCC_APB2ENR;      /* read back: the clock is on before the first access to the peripheral */
    GPIOA_MODER = (GPIOA_MODER & ~(0xFu << 18)) | (0xAu << 18); /* PA9, PA10: alternate function */
    GPIOA_AFRH = (GPIOA_AFRH & ~(0xFFu << 4)) | (0x77u << 4);   /* AF7: USART1 */
    USART1_BRR = (PCLK2_HZ + BAUD / 2) / BAUD;
    USART1_CR1 = (1u << 3) | (1u << 2) | 1u; /* TE, RE, UE */
    *argv = (char **)tinytrain_argv;
    return tinytrain_argc;
}

/* A board has nowhere to return to: report the code and sleep. */
void board_exit(int code) {
    fflush(stdout);
    fflush(stderr);
    printf("\n#exit %d\n", code);
    fflush(stdout);
    while (!(USART1_ISR & USART_ISR_TC)) {
    }
    for (;;) __asm volatile("wfi");
}

const char *const platform_counter_name = "cycles";

void platform_init(void) {
    DEMCR |= 1u << 24;      /* TRCENA: DWT on */
    DWT_LAR = 0xC5ACCE55u; /* the Cortex-M7 DWT is locked after reset */
    DWT_CYCCNT = 0;
    DWT_CTRL |= 1u;
}

/* CYCCNT is 32 bits (268 s at 16 MHz); it is extended here, which holds while calls are less than a wrap apart. */
uint64_t platform_counter(void) {
    static uint32_t last, wraps;
    uint32_t now = DWT_CYCCNT;
    if (now < last) wraps++;
    last = now;
    return (uint64_t)wraps << 32 | now;
}

int platform_data_open(const char *path) {
    (void)path; /* the one compiled-in dataset */
    return 0;
}

const void *platform_data_read(uint32_t offset, uint32_t bytes) {
    return offset <= tinytrain_dataset_bytes && bytes <= tinytrain_dataset_bytes - offset ? tinytrain_dataset + offset : NULL;
}

const void *platform_data_read_to(uint32_t offset, uint32_t bytes, void *dst) {
    (void)dst; /* the dataset is in flash: the row reader copies each row where the model wants it */
    return platform_data_read(offset, bytes);
}

static uint32_t hex_column;

void *platform_out_open(const char *out_dir, const char *name) {
    (void)out_dir;
    fflush(stdout); /* messages printed so far come before the file */
    usart_puts("\r\n#file ");
    usart_puts(name);
    usart_puts("\r\n");
    hex_column = 0;
    return (void *)name;
}

int platform_out_write(void *out, const void *data, uint32_t bytes) {
    static const char digits[] = "0123456789abcdef";
    (void)out;
    for (const uint8_t *p = data; bytes--; p++) {
        usart_put(digits[*p >> 4]);
        usart_put(digits[*p & 15]);
        if (++hex_column == HEX_BYTES_PER_LINE) {
            usart_puts("\r\n");
            hex_column = 0;
        }
    }
    return 0;
}

int platform_out_close(void *out) {
    usart_puts(hex_column ? "\r\n#end " : "#end ");
    usart_puts(out);
    usart_puts("\r\n");
    return 0;
}
