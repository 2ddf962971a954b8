"""The fields every training config has, with defaults and their meaning (not a runnable recipe).

Configs are plain data: a shipped config starts from `base_config()` and sets what differs.
`vmoe_train.config.validate_config` checks every field before anything compiles.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # params init, routing noise, dropout and the data order all derive from it

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "digits"  # any vmoe_data dataset: "digits", "tfds:cifar10", "image_folder:/p"
    c.dataset.data_dir = ""  # "" = the dataset's default ($VMOE_DATA_DIR, ~/.cache/vmoe/...)
    c.dataset.train_split = "train"
    c.dataset.eval_splits = ("validation",)  # evaluated every `eval.every_steps`
    c.dataset.test_split = "test"  # evaluated once at the end ("" = none)
    # () = every class; e.g. (5, 6, 7, 8, 9): only those, relabelled 0..4 (transfer experiments;
    # the pp's onehot depth must then be the number of classes kept).
    c.dataset.classes = ()
    c.dataset.num_workers = 0  # grain worker processes for the train pipeline
    # Hold splits in memory, so batches are made by vmoe-data's vectorised ops: "auto" (splits
    # up to 64 MiB whose examples stack), "always" (any size), "never" (read per example).
    c.dataset.cache = "auto"

    c.pp = ml_collections.ConfigDict()
    c.pp.train = "decode|value_range(-1, 1)|onehot(10)"  # vmoe_data preprocess specs
    c.pp.eval = "decode|value_range(-1, 1)"  # must keep "image" and "label"

    c.batch_size = 64  # global: split over processes and devices
    c.eval_batch_size = 128  # global
    c.num_steps = 1000  # optimizer updates
    # > 0: train this many passes over dataset.train_split instead (num_steps must then be 0):
    # steps = ceil(num_epochs * examples / batch_size) (as the V-MoE release), at build time.
    c.num_epochs = 0.0

    c.model = ml_collections.ConfigDict()
    # A vmoe_layers preset ("ViT-B/16", "V-MoE-S/32", ...), or a family alone ("ViT", "V-MoE")
    # for a model of any size: then the five sizes below must all be set.
    c.model.name = "V-MoE-Mu/2"
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params: param_dtype)
    # Parameter dtype: "float32", or "bfloat16": params, gradients and Adam's moments stored
    # and updated in bfloat16, no float32 master copy (half the memory; updates under ~2^-8 of
    # a param are lost). The routers' gates stay float32.
    c.model.param_dtype = "float32"
    # Sizes; 0 = the preset's (a preset may be changed field by field).
    c.model.patch_size = 0  # P: square patches, P must divide the image sides
    c.model.hidden_size = 0  # D
    c.model.num_layers = 0  # encoder blocks
    c.model.num_heads = 0  # attention heads; must divide hidden_size
    c.model.mlp_dim = 0  # H; e.g. for a dense twin of equal per-token FLOPs
    c.model.classifier = "token"  # "token" (a class token) or "gap" (mean of the patch tokens)
    c.model.representation_size = 0  # > 0: a Dense + tanh pre-logits layer of this size
    # The head's initial bias (its kernel starts at zero), e.g. -log(num_classes) as the V-MoE
    # release: a sigmoid loss then starts at the uniform prior instead of p = 0.5 per class.
    c.model.head_bias_init = 0.0
    # Activation rematerialisation: "none", "block" (each block keeps only its input for the
    # backward pass and recomputes the rest), "moe" (MoE blocks only), "dots" (keeps matmul
    # outputs). Same loss and gradients; less memory for more compute (vmoe_layers.REMAT).
    c.model.remat = "none"
    c.model.moe = ml_collections.ConfigDict()  # ignored for a dense "ViT-..." model
    c.model.moe.num_experts = 4
    c.model.moe.layers = "every-2"  # "every-2", "last-2", ... or a tuple of block indices
    c.model.moe.router = "top_k"  # any vmoe_routing router name: "top_k", "bpr", plugins
    # Options for the router, over vmoe_layers.DEFAULT_ROUTER_OPTIONS (k=2, capacity_factor=1.05,
    # V-MoE's pre-training recipe), which only reach routers that take them: so
    # `model.moe.router=soft` or `=dropless` works with no other change.
    c.model.moe.router_options = ml_collections.ConfigDict()
    c.model.moe.expert_type = "mlp"
    c.model.moe.group_images = 0  # images per routing group; 0 = the per-device batch
    c.model.moe.dispatch_dtype = ""  # "bfloat16": round expert buffers to it (the V-MoE release)
    # "independent": each expert drawn with its own key; "shared": one draw copied to all E
    # experts (the V-MoE release's split_rngs=False: routing alone sets them apart).
    c.model.moe.expert_init = "independent"
    c.model.moe.dropout_rate = -1.0  # dropout on the MoE layers' output; -1: model.dropout_rate
    # MoE layer variants (plugins, vmoe_layers.variants): {name: {option: value}}, e.g.
    # model.moe.variants.fine_grained.m=4 (vmoe-moe-fine-grained: E*m experts of width H/m,
    # K*m choices) or model.moe.variants.shared_experts.num_shared=1 (vmoe-moe-shared-experts).
    c.model.moe.variants = ml_collections.ConfigDict()

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"  # "softmax" or "sigmoid" cross-entropy
    c.loss.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # "adam", "adamw", "sgd" (with momentum)
    c.optimizer.learning_rate = 1e-3  # peak, after warmup
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.weight_decay = 1e-4  # decoupled; applied to params matching weight_decay_on
    # Which params decay: "matrices" (every weight matrix, plugins' too: vmoe_train.optim.decays;
    # not biases, norms, position embeddings) or a regex on "block_0/attention/..." paths.
    c.optimizer.weight_decay_on = "matrices"
    c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 = off
    # After warmup: "cosine", "linear" (to 0, or to end_learning_rate if set) or "constant".
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.end_lr_ratio = 0.01  # cosine ends at learning_rate * end_lr_ratio
    # >= 0: where cosine and linear decay end (the V-MoE release: 1e-5); < 0: as above.
    c.optimizer.end_learning_rate = -1.0
    c.optimizer.mu_dtype = ""  # Adam's first moment: "" (the params' dtype), "float32", "bfloat16"
    # Adam's second moment: "" (float32, whatever the params' dtype), "float32", "bfloat16".
    c.optimizer.nu_dtype = ""
    c.optimizer.frozen = ""  # regex on "block_0/attention/..." paths: these params never move
    c.optimizer.lr_multipliers = ()  # ((regex, multiplier), ...): first match wins
    # Gradient accumulation: each step's batch in n microbatches, one update with their mean
    # gradient (vmoe_train.steps.make_train_step); batch_size must split over devices x n.
    c.optimizer.microsteps = 1

    c.sharding = ml_collections.ConfigDict()
    c.sharding.strategy = "data"  # "data", "expert", "fsdp", "expert_fsdp" or a plugin's
    c.sharding.mesh_shape = ()  # () = the strategy's default over all devices

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 250  # 0 = only at the end
    c.eval.capacity_factor = 0.0  # routers' capacity factor at evaluation; 0 = the router's own
    # vmoe-eval evaluators (e.g. ("accuracy", "fewshot")) run at the trainer's evaluations through
    # the callback "evaluators", used whether or not log.callbacks names it (needs vmoe-eval).
    c.eval.evaluators = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 250  # 0 = only at the end
    c.checkpoint.keep = 3  # the last n; 0 = keep all
    # Also keep the best checkpoint by this eval metric, e.g. "validation/accuracy" (every
    # checkpoint step is then evaluated, so that each checkpoint carries its own step's value).
    c.checkpoint.keep_best = ""
    c.checkpoint.keep_best_mode = "auto"  # "max", "min"; "auto": loss min, accuracy max
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 25
    c.log.callbacks = ("progress", "jsonl", "tensorboard")  # vmoe_train callbacks, plugins too
    c.log.profile_steps = 0  # n: trace n steps after the first; (start, n); 0 = off

    c.resume = ml_collections.ConfigDict()
    # Fields that may differ from the checkpoint's config when a run resumes, although they
    # change its trajectory, e.g. ("num_steps",) to train longer; a group ("optimizer") takes
    # all its fields. Others that change it are refused; logging, eval, checkpoint cadence pass.
    c.resume.allow_changes = ()

    c.finetune = ml_collections.ConfigDict()
    c.finetune.init_from = ""  # a run dir or checkpoint dir to start from ("" = from scratch)
    c.finetune.step = -1  # its step to load; -1 = the latest
    c.finetune.new_head = True  # re-initialise the head (a new class count)
    # Initialisation rules (vmoe_train.init_rules): ((source regex, target template[, transform]),
    # ...), first match wins; transforms "copy", "tile", "zoom", "drop" or a plugin's. () = every
    # param of the same path and shape, position embeddings resized, the head by new_head.
    c.finetune.init_rules = ()
    # Sparse upcycling: init_from is the dense twin of this V-MoE (a run or a vit_jax .npz);
    # every expert starts as its block's MLP, the routers fresh (instead of init_rules).
    c.finetune.upcycle = False
    c.finetune.upcycle_noise = 0.0  # >0: Gaussian noise (x the array's std) on each expert copy
    c.finetune.keep_fresh = ""  # with rules: regex of params that start fresh on purpose
    c.finetune.unmatched = "error"  # with rules: a param no rule produces is "error" or "init"

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "host:port": call jax.distributed.initialize
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    return c
