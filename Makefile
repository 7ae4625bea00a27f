# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo ui test lint install constraints bench clean mutation

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the versions tested (constraints.txt) within the ranges pyproject.toml declares
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# after changing pyproject.toml's dependencies: the newest versions they allow, installed in a fresh venv, pinned
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q -e '.[test]'
	{ sed -n '/^#/p' constraints.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-constraints

demo: $(STAMP)
	$(VENV)/bin/mrcnn-cli demo --out demo_out $(if $(VERBOSE),--verbose)

# the MLflow UI on the demo's runs, on this machine only; then open the URL the demo printed
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath demo_out)/mlflow.db --host 127.0.0.1 --port 5000

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest tests -q --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing' >&2; exit 1; fi; exit $$rc

# mutation testing (not in CI: ~20 minutes on two cores): mutmut over pyproject.toml's [tool.mutmut] modules against
# their fast tests, one child under nice (others share the cores); `make mutation MUTANTS='mrcnn.detections*'` for one
# module (quoted: mutmut matches the names itself). Then the survivors: `$(VENV)/bin/mutmut show <name>`. Scores and the review of survivors: TESTING.md.
# Whole modules of mrcnn/ and the pure files of pipelines/; in the files that also drive Ray or MLflow, the pure
# functions only (their other functions are reached by no fast test)
MUTATION_SCOPE = 'mrcnn.*' 'pipelines.training.step.*' 'pipelines.data.coco_checks.*' 'pipelines.data.rows.*' \
	'pipelines.data.loader.x_rpn_labels__*' 'pipelines.data.loader.x_densify_rpn_deltas__*' \
	'pipelines.data.loader.x_decoder_for__*' 'pipelines.dag.x_stage_keys__*' 'pipelines.dag.x_stage_config_fields__*' \
	'pipelines.dag.x_pipeline_params__*' 'pipelines.dag.x_pipeline_stages__*' 'pipelines.dag.x_train_request__*' \
	'pipelines.dag.x_evaluate_request__*' \
	'pipelines.training.train.x_lowest_val_loss__*' 'pipelines.training.train.x_resume_refusal__*' \
	'pipelines.training.checkpoints.x_find_latest_checkpoint__*' 'pipelines.data.coco_results.*' \
	'pipelines.evaluation.inference.x_keep_detections__*' 'pipelines.evaluation.inference.x_way_back__*'
MUTANTS ?= $(MUTATION_SCOPE)
mutation: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[mutation]'
	nice -n 10 $(VENV)/bin/mutmut run --max-children 1 $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) demo_out mutants
