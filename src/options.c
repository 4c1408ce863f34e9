/* Options: one table, read once from ZKMEM_<NAME> at start-up; changeable
 * at run time with zk_option_set. Fast paths never read options. */
#include "internal.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct option_descriptor {
  const char *name; /* ZKMEM_<name> */
  long default_value;
  long max_value;
  /* Words accepted besides numbers, mapped to values. */
  const char *words[3];
  long word_values[3];
  bool bytes; /* K, M, G, T suffixes (powers of 1024) */
} option_descriptor_t;

static const option_descriptor_t option_table[ZK_OPTION_COUNT] = {
    [ZK_OPTION_PURGE_DELAY_MS] =
        {"PURGE_DELAY_MS", 1000, 3600L * 1000, {0}, {0}},
    [ZK_OPTION_PURGE_DECOMMIT] =
        {"PURGE_DECOMMIT", 1, 1, {"dontneed", "free"}, {1, 0}},
    [ZK_OPTION_HUGE_PAGES] = {"HUGE_PAGES",
                              ZK_HUGE_PAGES_OFF,
                              ZK_HUGE_PAGES_DENSE,
                              {"reserved", "transparent", "dense"},
                              {ZK_HUGE_PAGES_RESERVED,
                               ZK_HUGE_PAGES_TRANSPARENT, ZK_HUGE_PAGES_DENSE}},
    [ZK_OPTION_SECURE] = {"SECURE", 0, 1, {0}, {0}},
    [ZK_OPTION_ON_ERROR] = {"ON_ERROR", 0, 1, {"abort", "warn"}, {0, 1}},
    [ZK_OPTION_SHOW_STATS] = {"SHOW_STATS", 0, 1, {0}, {0}},
    [ZK_OPTION_VERBOSE] = {"VERBOSE", 0, 1, {0}, {0}},
    [ZK_OPTION_LIMIT] = {"LIMIT", 0, LONG_MAX, {0}, {0}, true},
};

long option_values[ZK_OPTION_COUNT] = {
    [ZK_OPTION_PURGE_DELAY_MS] = 1000,
    [ZK_OPTION_PURGE_DECOMMIT] = 1,
};

static bool option_parse(const option_descriptor_t *descriptor,
                         const char *text, long *value) {
  for (int i = 0; i < 3 && descriptor->words[i] != NULL; i++) {
    if (strcasecmp(text, descriptor->words[i]) == 0) {
      *value = descriptor->word_values[i];
      return true;
    }
  }
  if (strcasecmp(text, "true") == 0 || strcasecmp(text, "yes") == 0 ||
      strcasecmp(text, "on") == 0) {
    *value = 1;
    return descriptor->max_value >= 1;
  }
  if (strcasecmp(text, "false") == 0 || strcasecmp(text, "no") == 0 ||
      strcasecmp(text, "off") == 0) {
    *value = 0;
    return true;
  }
  char *end;
  errno = 0;
  long number = strtol(text, &end, 10);
  if (errno != 0 || end == text || number < 0)
    return false;
  if (descriptor->bytes && *end != '\0') {
    const char *units = "KMGT";
    const char *unit = strchr(units, end[0] & ~0x20); /* either case */
    if (unit == NULL || *unit == '\0')
      return false;
    end++;
    if ((*end & ~0x20) == 'I' && (end[1] & ~0x20) == 'B')
      end += 2; /* KiB, MiB ... */
    else if ((*end & ~0x20) == 'B')
      end++; /* KB, MB ... (also powers of 1024) */
    for (long scale = 0; scale <= unit - units; scale++)
      if (__builtin_mul_overflow(number, 1024L, &number))
        return false;
  }
  if (*end != '\0' || number > descriptor->max_value)
    return false;
  *value = number;
  return true;
}

void options_init(void) {
  int saved_errno = errno;
  for (int i = 0; i < ZK_OPTION_COUNT; i++) {
    const option_descriptor_t *descriptor = &option_table[i];
    option_values[i] = descriptor->default_value;
    char variable[64] = "ZKMEM_";
    strncat(variable, descriptor->name, sizeof(variable) - 7);
    const char *text = getenv(variable);
    if (text == NULL || *text == '\0')
      continue;
    long value;
    if (option_parse(descriptor, text, &value))
      option_values[i] = value;
    else
      error_warning("zkmem: warning: %s=\"%s\" is not valid; using %ld\n",
                    variable, text, descriptor->default_value);
  }
  if (option_values[ZK_OPTION_VERBOSE]) {
    for (int i = 0; i < ZK_OPTION_COUNT; i++)
      error_warning("zkmem: option ZKMEM_%s = %ld\n", option_table[i].name,
                    option_values[i]);
  }
  errno = saved_errno;
}

ZK_EXPORT long zk_option_get(zk_option_t which) {
  if ((unsigned)which >= ZK_OPTION_COUNT) {
    errno = EINVAL;
    return -1;
  }
  process_init();
  return option_values[which];
}

ZK_EXPORT int zk_option_set(zk_option_t which, long value) {
  if ((unsigned)which >= ZK_OPTION_COUNT || value < 0 ||
      value > option_table[which].max_value) {
    errno = EINVAL;
    return -1;
  }
  process_init();
  option_values[which] = value;
  return 0;
}
