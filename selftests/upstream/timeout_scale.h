/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Force-included (gcc -include) into the unmodified upstream hmm-tests.c by
 * scripts/build-kernel: scales the kselftest harness's per-case timeouts by
 * $DMIRROR_TIMEOUT_SCALE at start-up.
 *
 * The harness's timeouts (30 s a case, 120 s for benchmark_thp_migration)
 * are written for real hardware. Under TCG on a slow or busy host a case
 * that makes steady progress can cross them, and then the verdict says
 * more about the host than about the module. scripts/vm-run sets the scale
 * (4 under TCG, 1 under KVM); it is clamped to 1..10, so a case that hangs
 * is still killed and fails, only later.
 */
#include "kselftest_harness.h"

#define DMIRROR_TIMEOUT_SCALE_MAX 10

static void dmirror_scale_timeouts(void)
{
	const char *env = getenv("DMIRROR_TIMEOUT_SCALE");
	struct __fixture_metadata *f;
	struct __test_metadata *t;
	long scale;

	if (!env || !*env)
		return;
	scale = strtol(env, NULL, 10);
	if (scale < 1)
		scale = 1;
	if (scale > DMIRROR_TIMEOUT_SCALE_MAX)
		scale = DMIRROR_TIMEOUT_SCALE_MAX;
	for (f = __fixture_list; f; f = f->next)
		for (t = f->tests; t; t = t->next)
			t->timeout *= scale;
}

#undef TEST_HARNESS_MAIN
#define TEST_HARNESS_MAIN \
	int main(int argc, char **argv) \
	{ \
		dmirror_scale_timeouts(); \
		return test_harness_run(argc, argv); \
	}
