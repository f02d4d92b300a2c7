"""Golden IR text of the traced test models (docs/IR.md). Regenerate only for a deliberate format change."""

LENET = """\
graph LeNet(%x: f32[64,1,32,32], %conv1.weight: f32[6,1,5,5], %conv1.bias: f32[6], %conv2.weight: f32[16,6,5,5], %conv2.bias: f32[16], %fc1.weight: f32[120,400], %fc1.bias: f32[120], %fc2.weight: f32[84,120], %fc2.bias: f32[84], %fc3.weight: f32[10,84], %fc3.bias: f32[10]) {
  %1 = conv2d(%x, %conv1.weight, %conv1.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,6,28,28]  # conv1
  %2 = relu(%1) : f32[64,6,28,28]
  %3 = max_pool2d(%2, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,6,14,14]
  %4 = conv2d(%3, %conv2.weight, %conv2.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,16,10,10]  # conv2
  %5 = relu(%4) : f32[64,16,10,10]
  %6 = max_pool2d(%5, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,16,5,5]
  %7 = reshape(%6, shape=[64,400]) : f32[64,400]
  %8 = linear(%7, %fc1.weight, %fc1.bias) : f32[64,120]  # fc1
  %9 = relu(%8) : f32[64,120]
  %10 = linear(%9, %fc2.weight, %fc2.bias) : f32[64,84]  # fc2
  %11 = relu(%10) : f32[64,84]
  %12 = linear(%11, %fc3.weight, %fc3.bias) : f32[64,10]  # fc3
  return %12
}
"""

LENET_SEQUENTIAL = """\
graph Sequential(%input: f32[64,1,32,32], %0.weight: f32[6,1,5,5], %0.bias: f32[6], %3.weight: f32[16,6,5,5], %3.bias: f32[16], %7.weight: f32[120,400], %7.bias: f32[120], %9.weight: f32[84,120], %9.bias: f32[84], %11.weight: f32[10,84], %11.bias: f32[10]) {
  %1 = conv2d(%input, %0.weight, %0.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,6,28,28]  # 0
  %2 = relu(%1) : f32[64,6,28,28]  # 1
  %3 = max_pool2d(%2, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,6,14,14]  # 2
  %4 = conv2d(%3, %3.weight, %3.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,16,10,10]  # 3
  %5 = relu(%4) : f32[64,16,10,10]  # 4
  %6 = max_pool2d(%5, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,16,5,5]  # 5
  %7 = reshape(%6, shape=[64,400]) : f32[64,400]  # 6
  %8 = linear(%7, %7.weight, %7.bias) : f32[64,120]  # 7
  %9 = relu(%8) : f32[64,120]  # 8
  %10 = linear(%9, %9.weight, %9.bias) : f32[64,84]  # 9
  %11 = relu(%10) : f32[64,84]  # 10
  %12 = linear(%11, %11.weight, %11.bias) : f32[64,10]  # 11
  return %12
}
"""

LENET_ORDERED = """\
graph Sequential(%input: f32[64,1,32,32], %c1.weight: f32[6,1,5,5], %c1.bias: f32[6], %c3.weight: f32[16,6,5,5], %c3.bias: f32[16], %f5.weight: f32[120,400], %f5.bias: f32[120], %f6.weight: f32[84,120], %f6.bias: f32[84], %f7.weight: f32[10,84], %f7.bias: f32[10]) {
  %1 = conv2d(%input, %c1.weight, %c1.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,6,28,28]  # c1
  %2 = relu(%1) : f32[64,6,28,28]  # relu1
  %3 = max_pool2d(%2, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,6,14,14]  # s2
  %4 = conv2d(%3, %c3.weight, %c3.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,16,10,10]  # c3
  %5 = relu(%4) : f32[64,16,10,10]  # relu3
  %6 = max_pool2d(%5, kernel=[2,2], stride=[2,2], padding=[0,0], dilation=[1,1], ceil_mode=False) : f32[64,16,5,5]  # s4
  %7 = reshape(%6, shape=[64,400]) : f32[64,400]  # flat
  %8 = linear(%7, %f5.weight, %f5.bias) : f32[64,120]  # f5
  %9 = relu(%8) : f32[64,120]  # relu5
  %10 = linear(%9, %f6.weight, %f6.bias) : f32[64,84]  # f6
  %11 = relu(%10) : f32[64,84]  # relu6
  %12 = linear(%11, %f7.weight, %f7.bias) : f32[64,10]  # f7
  return %12
}
"""

MIXED_TRAIN = """\
graph Mixed(%x: f32[2,3,16,16], %stem.weight: f32[8,3,3,3], %stem.bias: f32[8], %bn.weight: f32[8], %bn.bias: f32[8], %grouped.weight: f32[8,4,3,2], %head.1.weight: f32[4,6], %head.1.bias: f32[4], %bn.running_mean: f32[8], %bn.running_var: f32[8], %bn.num_batches_tracked: i64[]) {
  %1 = conv2d(%x, %stem.weight, %stem.bias, stride=[2,2], padding=[1,1], dilation=[1,1], groups=1) : f32[2,8,8,8]  # stem
  %2 = count_(%bn.num_batches_tracked, by=1) : i64[]  # bn
  %3 = batch_norm(%1, %bn.running_mean, %bn.running_var, %bn.weight, %bn.bias, training=True, momentum=0.1, eps=1e-05) : f32[2,8,8,8]  # bn
  %4 = relu(%3) : f32[2,8,8,8]
  %5 = conv2d(%4, %grouped.weight, None, stride=[1,1], padding=[2,1], dilation=[2,1], groups=2) : f32[2,8,8,9]  # grouped
  %6 = tanh(%5) : f32[2,8,8,9]
  %7 = dropout(%6, p=0.25, training=True) : f32[2,8,8,9]  # drop
  %8 = adaptive_avg_pool2d(%7, output_size=[2,3]) : f32[2,8,2,3]  # pool
  %9 = reshape(%8, shape=[2,8,6]) : f32[2,8,6]  # head.0
  %10 = linear(%9, %head.1.weight, %head.1.bias) : f32[2,8,4]  # head.1
  %11 = reshape(%10, shape=[2,1,8,4]) : f32[2,1,8,4]
  %12 = softmax(%11, dim=3) : f32[2,1,8,4]  # softmax
  return %12
}
"""

MIXED_EVAL = """\
graph Mixed(%x: f32[2,3,16,16], %stem.weight: f32[8,3,3,3], %stem.bias: f32[8], %bn.weight: f32[8], %bn.bias: f32[8], %grouped.weight: f32[8,4,3,2], %head.1.weight: f32[4,6], %head.1.bias: f32[4], %bn.running_mean: f32[8], %bn.running_var: f32[8]) {
  %1 = conv2d(%x, %stem.weight, %stem.bias, stride=[2,2], padding=[1,1], dilation=[1,1], groups=1) : f32[2,8,8,8]  # stem
  %2 = batch_norm(%1, %bn.running_mean, %bn.running_var, %bn.weight, %bn.bias, training=False, momentum=0.1, eps=1e-05) : f32[2,8,8,8]  # bn
  %3 = relu(%2) : f32[2,8,8,8]
  %4 = conv2d(%3, %grouped.weight, None, stride=[1,1], padding=[2,1], dilation=[2,1], groups=2) : f32[2,8,8,9]  # grouped
  %5 = tanh(%4) : f32[2,8,8,9]
  %6 = dropout(%5, p=0.25, training=False) : f32[2,8,8,9]  # drop
  %7 = adaptive_avg_pool2d(%6, output_size=[2,3]) : f32[2,8,2,3]  # pool
  %8 = reshape(%7, shape=[2,8,6]) : f32[2,8,6]  # head.0
  %9 = linear(%8, %head.1.weight, %head.1.bias) : f32[2,8,4]  # head.1
  %10 = reshape(%9, shape=[2,1,8,4]) : f32[2,1,8,4]
  %11 = softmax(%10, dim=3) : f32[2,1,8,4]  # softmax
  return %11
}
"""

LENET_FUSED = """\
graph LeNet(%x: f32[64,1,32,32], %conv1.weight: f32[6,1,5,5], %conv1.bias: f32[6], %conv2.weight: f32[16,6,5,5], %conv2.bias: f32[16], %fc1.weight: f32[120,400], %fc1.bias: f32[120], %fc2.weight: f32[84,120], %fc2.bias: f32[84], %fc3.weight: f32[10,84], %fc3.bias: f32[10]) {
  %3 = conv_relu_pool[bias,relu,max_pool2d(2,2)](%x, %conv1.weight, %conv1.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1, act=relu, pool=max, pool_k=2) : f32[64,6,14,14]  # conv1
      # %1 conv2d (conv1), %2 relu, %3 max_pool2d
  %6 = conv_relu_pool[bias,relu,max_pool2d(2,2)](%3, %conv2.weight, %conv2.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1, act=relu, pool=max, pool_k=2) : f32[64,16,5,5]  # conv2
      # %4 conv2d (conv2), %5 relu, %6 max_pool2d
  %7 = reshape(%6, shape=[64,400]) : f32[64,400]
  %9 = linear_relu[bias,relu](%7, %fc1.weight, %fc1.bias, act=relu) : f32[64,120]  # fc1
      # %8 linear (fc1), %9 relu
  %11 = linear_relu[bias,relu](%9, %fc2.weight, %fc2.bias, act=relu) : f32[64,84]  # fc2
      # %10 linear (fc2), %11 relu
  %12 = linear(%11, %fc3.weight, %fc3.bias) : f32[64,10]  # fc3
  return %12
}
"""
