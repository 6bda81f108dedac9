"""bench train --ops: trace kernels mapped to the model operations they run, summed by pass and operation."""
from carvana_jax.bench import op_profile

HLO = """
ENTRY %main {
  %fusion.3 = f32[4,8]{1,0} fusion(%p0), kind=kCustom, metadata={op_name="jit(train_step)/jvp(UNet)/down0/Conv_0/conv_general_dilated" stack_frame_id=1}
  %fusion.4 = f32[4,8]{1,0} fusion(%p0), kind=kCustom, metadata={op_name="jit(train_step)/transpose(jvp(UNet))/down0/Conv_0/conv_general_dilated"}
  %wrapped_iota.2 = s32[4,8]{1,0} fusion(), kind=kLoop
  ROOT %reduce.7 = f32[8]{0} reduce(%fusion.4), metadata={op_name="jit(train_step)/jvp(UNet)/BatchNorm_0/reduce_sum"}
}
"""


def test_the_program_text_names_its_kernels_and_their_operations():
    assert op_profile.instructions(HLO) == {"fusion.3", "fusion.4", "wrapped_iota.2", "reduce.7"}
    names = op_profile.op_names(HLO)
    assert set(names) == {"fusion.3", "fusion.4", "reduce.7"}
    assert op_profile.category("fusion.3", names) == "forward conv_general_dilated"
    assert op_profile.category("fusion.4", names) == "backward conv_general_dilated"
    assert op_profile.category("wrapped_iota.2", names) == "wrapped_iota"  # no op_name: its fusion kind


def test_kernel_times_are_summed_per_step_by_operation_and_the_runtime_left_out():
    events = [{"ph": "X", "name": "fusion.3", "dur": 3000}, {"ph": "X", "name": "fusion.3", "dur": 1000},
              {"ph": "X", "name": "fusion.4", "dur": 6000}, {"ph": "X", "name": "reduce.7", "dur": 400},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99000},  # encloses the kernels
              {"ph": "i", "name": "fusion.3"}]  # an instant event: no duration
    kernels = op_profile.kernel_ms(events, op_profile.instructions(HLO), steps=2)
    assert kernels == {"fusion.3": 2.0, "fusion.4": 3.0, "reduce.7": 0.2}
    table = op_profile.op_table(kernels, op_profile.op_names(HLO))
    assert table == [("backward conv_general_dilated", 3.0), ("forward conv_general_dilated", 2.0),
                     ("forward reduce_sum", 0.2)]
