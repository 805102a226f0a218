;; Lead-score alert guest: emits one `notify` for the sales department
;; when the released score (`score`) reaches the threshold. It sees only
;; the integers the host gives (`sovra.attr`) and acts only through
;; `sovra.emit`; the manifest's capabilities bound what it may emit.
(module
  (import "sovra" "attr" (func $attr (param i32 i32) (result i64)))
  (import "sovra" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)
  ;; The attribute's name.
  (data (i32.const 0) "score")
  ;; The action, as JSON (136 bytes).
  (data (i32.const 16) "{\"id\":\"alert_rep\",\"kind\":\"notify\",\"to\":\"department:sales\",\"template\":\"hot_lead\",\"deadline\":\"300ms\",\"escalate_to\":\"department:sales_ops\"}")
  (func (export "run") (result i32)
    (local $score i64)
    (local.set $score (call $attr (i32.const 0) (i32.const 5)))
    ;; No score at all is a failed run, not a silent skip.
    (if (i64.eq (local.get $score) (i64.const 0x8000000000000000))
      (then (return (i32.const 1))))
    (if (i64.ge_s (local.get $score) (i64.const 700))
      (then (call $emit (i32.const 16) (i32.const 136))))
    (i32.const 0)))
