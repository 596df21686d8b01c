/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Logging to the kernel trace pipe. The level is a load-time constant (`mg_log_level`, set by the
 * loader through .rodata); the verifier removes the disabled branches, so a program loaded with
 * MG_LOG_OFF carries no logging code at all.
 */
#ifndef MARGAY_LIB_LOG_H
#define MARGAY_LIB_LOG_H

#include <bpf/bpf_helpers.h>

#include "margay/types.h"

const volatile __u32 mg_log_level = MG_LOG_OFF;

#define mg_debug(fmt, ...)                                                                         \
	do {                                                                                       \
		if (mg_log_level >= MG_LOG_DEBUG)                                                  \
			bpf_printk("margay: " fmt, ##__VA_ARGS__);                                 \
	} while (0)

#define mg_info(fmt, ...)                                                                          \
	do {                                                                                       \
		if (mg_log_level >= MG_LOG_INFO)                                                   \
			bpf_printk("margay: " fmt, ##__VA_ARGS__);                                 \
	} while (0)

#endif /* MARGAY_LIB_LOG_H */
