/* The stand-in model needs no kernels of its own; a generated model puts its int8 kernels here. */
