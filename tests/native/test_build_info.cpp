// build_info()/check_runtime() answer on any machine; without CUDA (build or driver) check_runtime throws a
// message that says why.
#include <cstdio>

#include "test_util.h"
#include "version.h"

int main() {
  asyncdiff_rt::BuildInfo info = asyncdiff_rt::build_info();
  std::printf("version=%s with_cuda=%d with_nccl=%d cudart=%d driver=%d devices=%d nccl=%d/%d problem='%s'\n",
              info.version.c_str(), info.with_cuda, info.with_nccl, info.cuda_runtime_version, info.cuda_driver_version,
              info.device_count, info.nccl_compiled, info.nccl_runtime, info.runtime_problem.c_str());
  EXPECT(!info.version.empty());
  if (info.with_nccl) EXPECT(info.nccl_runtime > 0);
  if (info.runtime_problem.empty()) {
    asyncdiff_rt::check_runtime();
  } else {
    EXPECT_THROWS_WITH(asyncdiff_rt::check_runtime(), "asyncdiff_rt");
  }
  if (!info.with_cuda) EXPECT_THROWS_WITH(asyncdiff_rt::check_runtime(), "built without CUDA");
  std::printf("ok\n");
  return 0;
}
