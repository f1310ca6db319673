# Convenience targets; each wraps a script that also works without make.
.PHONY: demo test bench clean

demo:  ## set up .venv and run the built-in example
	bash scripts/demo.sh

test:  ## set up .venv-test and run the test suite
	bash scripts/test.sh

bench:  ## conversion speed and memory against the read+write floor
	bash scripts/setup_env.sh .venv-test "test,timm,onnx,plot,ultralytics,mmpretrain" && .venv-test/bin/python scripts/bench.py

clean:
	rm -rf out .pytest_cache .hypothesis
