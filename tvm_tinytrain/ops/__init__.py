"""The int8 operators: numpy reference (:mod:`.reference`) and TVM kernels (:mod:`.te_kernels`).

Both consume the fixed-point constants of :mod:`.constants`, derived once per
node from the float scales by :mod:`tvm_tinytrain.quant`.
"""
