"""``@triton.jit`` helpers shared by several kernel families."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to a (row tile, column tile) in grouped order: GROUP_M consecutive row tiles
    walk the column tiles together, so each weight column tile is reused from L2 by GROUP_M programs."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % rows
    pid_n = (pid % in_group) // rows
    return pid_m, pid_n


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``tl.dot`` of two tiles of one dtype; with UPCAST (set by the launchers under the Triton interpreter,
    whose low-precision dot is wrong) the product is taken in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        return tl.dot(a, b, input_precision=INPUT_PRECISION)
