"""Families of ONNX operators, by what their outputs are made of (facts of the operator set, shared by the passes)."""

from __future__ import annotations

#: Ops that compute every output element from the input elements at the same (broadcast) index.
ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "Cast", "CastLike", "Ceil", "Clip", "Cos", "Div", "Elu",
    "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity",
    "IsInf", "IsNaN", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul", "Neg",
    "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Softplus",
    "Softsign", "Sqrt", "Sub", "Sum", "Tanh", "ThresholdedRelu", "Where", "Xor",
})
