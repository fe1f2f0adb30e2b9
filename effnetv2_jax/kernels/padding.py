"""TensorFlow's 'SAME' padding, as the official models convolve."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding for one spatial dim: the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2
