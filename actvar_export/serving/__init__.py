"""Serving with Triton Inference Server: model repositories (`repository`), the `actvar` Python model
(`triton_model`), request packing over a bundle (`generator`), the server launcher (`server`) and a
client (`client`)."""
