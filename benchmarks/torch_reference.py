"""The PyTorch FSP reference the benchmark measures us against (RepDistiller-style code).

The same CIFAR ResNets as fsp_jax.models (3x3 stem, option-A zero-padding shortcuts, MSRA
init), returning the features at each stage's input and output; the same FSP matrix (sum over
positions / (h * w)) and loss (1/B sum over images and stages of the squared Frobenius norm);
SGD with momentum 0.9 and coupled weight decay 1e-4. Images in channels_last memory format, on
the device named (a GPU where there is one), the forward passes under bfloat16 autocast where
asked.
"""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.stride, self.extra = stride, planes - inplanes

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.stride != 1 or self.extra:  # Option A: subsample, zero-pad the channels.
      x = x[:, :, ::self.stride, ::self.stride]
      x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(x + y)


class CifarResNet(nn.Module):
  """depth = 6n + 2; forward(x) -> (logits, [stage1_in, stage1_out, stage2_in, ...])."""

  def __init__(self, depth, num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    stages, inplanes = [], 16
    for k, planes in enumerate((16, 32, 64)):
      blocks = [BasicBlock(inplanes, planes, 2 if k else 1)]
      blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
      stages.append(nn.Sequential(*blocks))
      inplanes = planes
    self.stages = nn.ModuleList(stages)
    self.fc = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    features = []
    for stage in self.stages:
      features.append(x)
      x = stage(x)
      features.append(x)
    return self.fc(x.mean((2, 3))), features


def fsp_matrices(features):
  """[B, m, h, w] pairs (stage input, stage output) -> [B, m, n] each."""
  matrices = []
  for first, second in zip(features[::2], features[1::2]):
    if first.shape[2] > second.shape[2]:
      first = F.max_pool2d(first, first.shape[2] // second.shape[2])
    h, w = second.shape[2:]
    matrices.append(torch.einsum('bmhw,bnhw->bmn', first, second) / (h * w))
  return matrices


def fsp_loss(student_features, teacher_matrices):
  batch = student_features[0].shape[0]
  return sum(((s - t) ** 2).sum() for s, t in zip(fsp_matrices(student_features),
                                                  teacher_matrices)) / batch


class Steps:
  """The steps the benchmark times, for a teacher -> student pair at one batch size."""

  def __init__(self, teacher_depth, student_depth, batch_size, image_size=32, device='cpu',
               dtype='float32'):
    torch.manual_seed(0)
    place = lambda model: model.to(device, memory_format=torch.channels_last)
    self.teacher = place(CifarResNet(teacher_depth)).eval()
    self.student = place(CifarResNet(student_depth))
    self.optimizer = torch.optim.SGD(self.student.parameters(), lr=1e-3, momentum=0.9,
                                     weight_decay=1e-4)
    self.images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    self.labels = torch.randint(0, 10, (batch_size,), device=device)
    self.autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')
    with torch.no_grad(), self.autocast():
      self.cached = [g.clone() for g in fsp_matrices(self.teacher(self.images)[1])]

  def _update(self, loss):
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()

  def stage1(self):
    """Teacher pass (inference) + student FSP step."""
    self.student.train()
    with torch.no_grad(), self.autocast():
      targets = fsp_matrices(self.teacher(self.images)[1])
    with self.autocast():
      loss = fsp_loss(self.student(self.images)[1], targets)
    self._update(loss)

  def stage1_cached(self):
    """Student FSP step against stored teacher matrices."""
    self.student.train()
    with self.autocast():
      loss = fsp_loss(self.student(self.images)[1], self.cached)
    self._update(loss)

  def stage2(self):
    self.student.train()
    with self.autocast():
      loss = F.cross_entropy(self.student(self.images)[0], self.labels)
    self._update(loss)

  def eval(self):
    self.student.eval()
    with torch.no_grad(), self.autocast():
      self.student(self.images)
