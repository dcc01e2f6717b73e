"""10-class CIFAR-10 (32x32) versions of zoo models, as MODEL specs for the benchmarks
(``benchmarks/cifar_models.py:mobilenetv1_cifar10``): the zoo's MobileNetV1 is the 1000-class latency reference."""

from chita_edge.models.zoo import MobileNetV1


def mobilenetv1_cifar10() -> MobileNetV1:
    """MobileNetV1 1.0 with a 10-class head: the model ``benchmarks/scale.py`` trains on the CIFAR-10 subset."""
    return MobileNetV1(num_classes=10)
