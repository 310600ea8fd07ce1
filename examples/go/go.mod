module spo-runtime/examples/go

go 1.19

require spo-runtime/spo v0.0.0

replace spo-runtime/spo => ../../bindings/go
